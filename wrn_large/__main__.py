"""``python -m wrn_large [PATTERN] [--family cifar|imagenet]``: builds every registry model
(on the meta device, so even 100M-parameter ones are instant) and prints a table of depth,
width, parameters (ours and the paper's) and GFLOPs.

Commands on a trained checkpoint (predict, export) are ``python -m engine ...``: this registry
depends on nothing of ours."""
from __future__ import annotations

import argparse
import sys

from . import count_macs, count_params, list_models, model_info
from .stats import build_on_meta


def describe(name: str) -> dict:
    model = build_on_meta(name)
    info = model_info(name)
    width = getattr(model, "widen_factor", None) or getattr(model, "width")
    block = "B(" + ",".join(map(str, model.kernels)) + ")" if hasattr(model, "kernels") else (
        "bottleneck" if model.depth >= 50 else "basic")
    return {"name": name, "family": info.family, "depth": model.depth, "width": f"{width:g}",
            "block": block, "params_m": count_params(model) / 1e6,
            "paper_m": info.paper_params_m or "-", "source": info.paper_table or "-",
            "gflops": count_macs(model) / 1e9}


def format_table(rows: list[dict]) -> str:
    header = f"{'model':<22}{'family':<10}{'depth':>6}{'width':>7}  {'block':<11}" \
             f"{'params(M)':>10}{'paper(M)':>10}  {'source':<11}{'GFLOPs':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['name']:<22}{r['family']:<10}{r['depth']:>6}{r['width']:>7}  "
                     f"{r['block']:<11}{r['params_m']:>10.2f}{r['paper_m']:>10}  "
                     f"{r['source']:<11}{r['gflops']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("predict", "export"):   # they moved to the engine's layer
        print(f"error: {argv[0]} is `python -m engine {argv[0]} ...` (this command lists the "
              f"registry's models)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m wrn_large", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'wrn_40*'")
    parser.add_argument("--family", choices=["cifar", "imagenet"], help="only this family")
    args = parser.parse_args(argv)
    names = list_models(args.pattern, args.family)
    if not names:
        parser.error(f"no model matches {args.pattern!r}; try `python -m wrn_large` for all")
    print(format_table([describe(n) for n in names]))
    print("\nGFLOPs are multiply-adds of one forward pass at 32x32 (cifar) or 224x224 (imagenet).")
    print("Init: cifar = the authors' code (conv fan-in, BatchNorm weight U(0, 1)), or\n"
          "init=torchvision; imagenet = torchvision's (conv fan-out, BatchNorm weight 1).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
