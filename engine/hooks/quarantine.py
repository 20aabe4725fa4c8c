"""The bad images of the run (``data.on_bad_image=skip``, pipelines/quarantine.py): the
quarantines the loaders fill, shared by all ranks after each epoch and at every checkpoint (so
every rank skips what any rank found, and a resumed run skips them too), listed by rank 0 in
``RUN_DIR/bad_images.txt``; the epoch's record says how many validation images were left out."""
from __future__ import annotations

import logging
from pathlib import Path

from pipelines.quarantine import BAD_IMAGES, Quarantine

from ..checkpoint import write_text_atomic
from ..distributed import all_gather_object
from .base import Hook

log = logging.getLogger("wrn_large.train")


class QuarantineHook(Hook):
    name = "quarantine"

    def __init__(self, quarantines: dict[str, Quarantine], out: str | Path, is_main: bool = True):
        self.quarantines, self.out, self.is_main = quarantines, Path(out), is_main

    def share(self) -> dict:
        """Every rank's finds merged into every rank's quarantines (a collective); by split."""
        for states in all_gather_object({s: q.state() for s, q in self.quarantines.items()}):
            for split, state in states.items():
                self.quarantines[split].merge(state)
        if self.is_main and any(len(q) for q in self.quarantines.values()):
            lines = [line for q in self.quarantines.values() for line in q.listing()]
            write_text_atomic(self.out / BAD_IMAGES, "\n".join(lines) + "\n")
        return {split: q.state() for split, q in self.quarantines.items()}

    def after_epoch(self) -> None:
        bad = self.share().get("val")
        record = self.trainer.state.history[-1]
        if bad and "top1" in record:       # evaluated this epoch
            record["val_skipped"] = len(bad)
            if self.is_main:
                log.warning("evaluated over %d images: %d bad validation image(s) left out (%s)",
                            record["val_samples"], len(bad), BAD_IMAGES)

    def state_dict(self) -> dict:
        return self.share()

    def load_state_dict(self, state) -> None:
        for split, q in self.quarantines.items():
            q.merge((state or {}).get(split, {}))
