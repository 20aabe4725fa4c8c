#!/usr/bin/env python
"""Reproduce a table of the paper: every config trained with N seeds, then the table of our
medians and spreads beside the paper's numbers (each config's `paper:` section).

  python reproduce.py configs/cifar/table6/*.yaml --seeds 5 data.root=/data/cifar-10-batches-py
  python reproduce.py configs/cifar/table6/*.yaml --seeds 5 data.dataset=cifar100 \\
      data.root=/data/cifar-100-python                       # the same table's CIFAR-100 column
  python reproduce.py configs/cifar/table6/*.yaml --seeds 5 --slurm \\
      --sbatch-args='--partition=gpu --gpus-per-node=1'
  python reproduce.py configs/cifar/table6/*.yaml --seeds 5 --table   # only the table, of what finished

Each run goes to OUT/<config>/<dataset>/seed<k> (OUT is --out). The same command after a crash,
a kill or a cancelled array does only what is missing: a finished run is never run again, an
interrupted one resumes from its last checkpoint. SIGTERM to this process is passed to the run
in progress, which checkpoints and stops (exit 143). KEY=VALUE overrides apply to every run, as in
train_imagenet.py; a run directory that holds a run of another config is refused, but operational
keys (data.workers, data.read_ahead, timeouts, logging, ports: engine/provenance.py's
OPERATIONAL) may change between the starts of a run.

OUT/results.csv has one row per run and metric with its commit, config digest, seed, world size,
precision, hardware, versions and starts; OUT/results_summary.csv one row per network and data
set (n, median, mean, std, min, max of the test error, the paper's number, statistic and runs,
and the difference); OUT/results.md the table in the paper's layout (networks down, data sets
across); OUT/results.png each seed's point and the paper's value. Runs of one row that differ in
config or commit are refused (or shown apart: --split-mixed). A run whose starts (its first and
every resume) differ in commit, config digest, world size or precision is flagged: a warning here, its
mixed_starts column in results.csv and a line in results.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="+", metavar="CONFIG | KEY=VALUE",
                        help="YAML recipes, one per network of the table; KEY=VALUE overrides "
                             "for every run, e.g. data.root=/data/cifar")
    parser.add_argument("--seeds", type=int, default=5, help="runs per config (default 5, the paper's)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+N-1")
    parser.add_argument("--out", default="runs/reproduce", help="the runs and the table")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per local run (torchrun with more than 1)")
    parser.add_argument("--slurm", action="store_true",
                        help="submit the missing runs as one job array of launch/slurm.sbatch "
                             "and return")
    parser.add_argument("--sbatch-args", default="",
                        help="with --slurm: sbatch options, e.g. '--partition=gpu --gpus-per-node=1'")
    parser.add_argument("--table", action="store_true",
                        help="run nothing: write the table of the runs that have finished")
    parser.add_argument("--split-mixed", action="store_true",
                        help="runs of one row with different configs or commits: show them "
                             "apart instead of refusing")
    args = parser.parse_intermixed_args(argv)
    args.configs = [w for w in args.items if "=" not in w]
    args.overrides = [w for w in args.items if "=" in w]
    if not args.configs:
        parser.error("no CONFIG given")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # the configs and the paths they read are checked before torch is imported (results_table
    # imports it, below): a mistyped path is said at once
    from engine.config import ConfigError, check_paths, load_config
    from engine.sweep import STOPPED, claim, plan, queued_array, run_locally, submit_array

    if args.seeds < 1:
        print("error: --seeds must be at least 1", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        print(f"error: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    try:
        runs = plan(args.configs, list(range(args.first_seed, args.first_seed + args.seeds)),
                    out, args.overrides)
        if not (args.table or args.slurm):  # the array's nodes check theirs (node-local data)
            for run in {r.config: r for r in runs}.values():    # the seeds share their paths
                check_paths(load_config(run.config, run.overrides))
        for run in runs:
            claim(run)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    missing = [r for r in runs if not r.finished]
    failed = []
    if missing and not args.table:
        if args.slurm:
            queued = queued_array(out)
            if queued:
                print(f"array {queued} of this sweep is still in SLURM's queue: wait for it (or "
                      f"scancel it), then run this command again", file=sys.stderr)
                return 1
            job = submit_array(missing, out, shlex.split(args.sbatch_args))
            print(f"submitted job array {job}: {len(missing)} run(s) of {len(runs)}; run this "
                  f"command again when it has ended, for the table (or what is still missing)")
            return 0
        for k, run in enumerate(missing, 1):
            state = "resumes" if run.started else "starts"
            print(f"[{k}/{len(missing)}] {run.name} seed {run.seed} {state} in {run.run_dir}",
                  flush=True)
            try:
                code = run_locally(run, args.nproc)
            except KeyboardInterrupt:
                print("interrupted; the same command resumes the sweep from each run's last "
                      "checkpoint", file=sys.stderr)
                return 130
            if code == STOPPED:   # SIGTERM, the run checkpointed: the user stops the sweep
                print("stopped; the same command resumes the sweep", file=sys.stderr)
                return STOPPED
            if code == 2:     # a user's mistake (its line above names it): every run meets it
                return 2
            if code != 0 or not run.finished:
                failed.append((run, code))
                print(f"run failed (exit {code}): {run.run_dir}/train.log", file=sys.stderr)
    from engine.results_table import MixedRuns, read_run, start_warnings, write_table
    results = [r for r in (read_run(p.run_dir, p.name, p.order, p.paper) for p in runs) if r]
    for line in start_warnings(results):
        print(f"warning: {line}", file=sys.stderr)
    try:
        write_table(results, out, args.split_mixed)
    except MixedRuns as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    left = len(runs) - len(results)
    print(f"{len(results)} of {len(runs)} runs finished -> {out}/results.md, results.csv, "
          f"results_summary.csv, results.png" + (f"; {left} still to run" if left else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    from engine import exit_frozen
    exit_frozen(main())
