"""torchrun, as launch/multinode.sh and launch/slurm.sbatch run it: the same arguments and the
same agent (``torch.distributed.run``), with one ending made one line. An elastic job
(``--nnodes=MIN:MAX``) whose nodes fall below MIN waits in the rendezvous for ``join_timeout``
seconds (``--rdzv-conf=join_timeout=S``, torch's default 600) and then stops; torchrun says so
with a traceback of its own internals. Here it is one line that names the rule and the last
complete checkpoint, exit code 3::

    python launch/torchrun.py --nnodes=2:4 --nproc-per-node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=node001:29500 --rdzv-id=wrn --max-restarts=10 \\
        train_imagenet.py --config configs/imagenet/wrn50_2_bottleneck.yaml ...
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BELOW_MIN = 3


def config_args(script_args: list[str]) -> tuple[str | None, list[str]]:
    """train_imagenet.py's --config (``--config X`` or ``--config=X``) and its overrides."""
    config = None
    for i, arg in enumerate(script_args):
        if arg == "--config" and i + 1 < len(script_args):
            config = script_args[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    return config, [a for a in script_args if "=" in a and not a.startswith("-")]


def last_checkpoint(script_args: list[str]) -> str:
    """The newest complete checkpoint of the run ``train_imagenet.py script_args`` writes, in
    words (best effort: the config may not even load here)."""
    sys.path.insert(0, str(REPO))
    try:
        from engine import checkpoint as ckpt
        from engine.config import load_config
        cfg = load_config(*config_args(script_args))
        folder = ckpt.checkpoint_dir(cfg.run.output_dir, cfg.run.checkpoint_dir)
        newest = ckpt.newest_complete(folder)
    except Exception:   # noqa: BLE001 - the line is said whatever the config holds
        return "the run's last complete checkpoint stands"
    return f"the last complete checkpoint, {newest}, stands" if newest else \
        f"no checkpoint was written yet (in {folder})"


def below_min_line(args) -> str:
    low, _, high = str(args.nnodes).partition(":")
    rule = (f"an elastic job goes on with at least {low} nodes, up to {high}"
            if high and high != low else f"the job needs {low} nodes")
    return (f"error: fewer than {low} nodes joined rendezvous {args.rdzv_id!r} at "
            f"{args.rdzv_endpoint} in time (--nnodes={args.nnodes}: {rule}); the job stops "
            f"here and {last_checkpoint(list(args.training_script_args))}. The same command "
            f"resumes from it once {low} nodes are up.")


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError
    from torch.distributed.run import main as torchrun, parse_args

    low, _, high = str(parse_args(argv).nnodes).partition(":")
    if high and high != low:                    # an elastic job
        # A node that joins a running elastic job waits forever for the rendezvous' bootstrap
        # keys: with the agents' TCP store shared with the workers (torch's default), the
        # agent that stays rank 0 writes them in the first round only (torch 2.14,
        # dynamic_rendezvous.next_rendezvous). Unshared, rank 0 writes them every round.
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        # the trainer sizes each rank's micro-batch for the full job (engine/membership.py)
        os.environ["WRN_ELASTIC_NODES"] = f"{low}:{high}"
    else:                                       # never inherited from an elastic job around it
        os.environ.pop("WRN_ELASTIC_NODES", None)
    try:
        torchrun(argv)
    except RendezvousTimeoutError:
        print(below_min_line(parse_args(argv)), file=sys.stderr, flush=True)
        return BELOW_MIN
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
