"""Commands on a run's checkpoint (the training engine's layer; the model registry,
``python -m wrn_large``, depends on nothing of ours):

  python -m engine predict CHECKPOINT IMAGE_OR_FOLDER...   top-k classes per image
  python -m engine export CHECKPOINT --format onnx          a file for serving, checked on images

Training is ``train_imagenet.py`` (evaluation: ``train_imagenet.py --eval-only``), a table of the
paper over seeds ``reproduce.py``. ``python -m engine COMMAND --help`` for each."""
from __future__ import annotations

import sys

COMMANDS = {"predict": "engine.inference", "export": "engine.export"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    from engine import exit_frozen
    exit_frozen(main())
