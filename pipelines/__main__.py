"""Data tools.

    python -m pipelines verify DATA_DIR [--out FILE] [--workers N]   scan, report, clean list
    python -m pipelines pack DATA_DIR OUT [--file-list L]           tar shards for parallel file systems
    python -m pipelines make-default-data [DIR]                      the built-in demo data set
    python -m pipelines prepare-imagenet --train T --val V --devkit D --out DIR
                                     the ILSVRC2012 release -> our layout (links, no copies)
"""
from __future__ import annotations

import sys


def make_default_data(argv: list[str]) -> int:
    import argparse
    from .default_data import ensure_default_dataset
    p = argparse.ArgumentParser(prog="python -m pipelines make-default-data",
                                description="Generate the built-in ImageNet-layout demo data set "
                                            "(default: $WRN_DEFAULT_DATA or data/default_imagenet).")
    p.add_argument("dir", nargs="?")
    print(ensure_default_dataset(p.parse_args(argv).dir))
    return 0


def pack(argv: list[str]) -> int:
    from . import sources  # noqa: F401 - every source, and the pack destinations they add (s3://)
    from .pack import main as pack_main
    return pack_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"verify": lambda rest: __import__("pipelines.verify", fromlist=["main"]).main(rest),
                "pack": pack,
                "make-default-data": make_default_data,
                "prepare-imagenet": lambda rest: __import__(
                    "pipelines.prepare_imagenet", fromlist=["main"]).main(rest)}
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
