"""What a run holds in its directory while it trains: rank 0's locks (one job per run
directory, engine/checkpoint.py's ``RunDirLock``; one per checkpoint folder elsewhere, e.g. an
S3 prefix's ``PrefixLock``) and the ``train.log`` handler; both let go when
training ends, so a process that goes on (a test, a sweep) can run there again."""
from __future__ import annotations

import logging

from .base import Hook


class RunDirHook(Hook):
    def __init__(self, locks=(), log_handler: logging.Handler | None = None,
                 log_level: int | None = None):
        self.locks, self.log_handler, self.log_level = list(locks), log_handler, log_level

    def after_train(self) -> None:
        if self.log_handler is not None:
            root = logging.getLogger()
            root.removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None
            if self.log_level is not None:
                root.setLevel(self.log_level)
        while self.locks:
            self.locks.pop().release()
