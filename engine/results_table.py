"""The table of a sweep (reproduce.py): every finished run's final test error, per network and
data set the median and spread over seeds beside the paper's number, as results.csv (one row per
run, with its provenance), results_summary.csv (one row per network and data set: n, median,
mean, std, min, max, the paper's number and statistic), results.md (the paper's layout:
networks down, data sets across) and results.png (each seed's point, our median and the
paper's value).

A run resumed at another commit, config digest, world size, precision or micro-batch than it
started with is flagged, not refused: results.csv's ``mixed_starts`` names what differs,
results.md lists it below the tables and reproduce.py prints a warning (``start_warnings``)."""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .metrics import fmt
from .provenance import mixed_starts

DATASET_METRICS = {"cifar10": ("cifar10",), "cifar100": ("cifar100",), "svhn": ("svhn",),
                   "imagenet": ("top1", "top5")}
METRIC_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "svhn": "SVHN",
                 "top1": "top-1", "top5": "top-5"}
CSV_COLUMNS = ("network", "table", "metric", "seed", "test_error", "paper", "config",
               "config_digest", "commit", "world_size", "precision", "deterministic", "hardware",
               "versions", "starts", "mixed_starts", "run_dir")
SUMMARY_COLUMNS = ("network", "table", "dataset", "metric", "n", "median", "mean", "std", "min",
                   "max", "paper", "paper_statistic", "paper_runs", "diff", "mixed_start_runs",
                   "config", "config_digest", "commit")


class MixedRuns(ValueError):
    """Runs of one row differ in config or commit."""


@dataclass
class RunResult:
    """One finished run, as its result.json and config.yaml tell it."""
    network: str        # the paper's row label, else the config's name
    config: str
    order: int          # the config's place on the command line
    table: str
    seed: int
    run_dir: Path
    provenance: dict
    errors: dict        # metric -> our test error in %
    paper: dict         # metric -> the paper's, where it gives one
    paper_statistic: str
    paper_runs: int

    @property
    def starts(self) -> list[dict]:
        """Its starts (result.json's ``starts``; none listed by runs of older code)."""
        return self.provenance.get("starts") or []

    @property
    def mixed(self) -> dict[str, list]:
        return mixed_starts(self.starts)


@dataclass
class Row:
    network: str
    metric: str
    runs: list = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [r.errors[self.metric] for r in self.runs]

    def stats(self) -> dict:
        v = self.values
        paper = self.runs[0].paper.get(self.metric)
        ours = statistics.mean(v) if self.runs[0].paper_statistic == "mean" else statistics.median(v)
        return {"n": len(v), "median": statistics.median(v), "mean": statistics.mean(v),
                "std": statistics.stdev(v) if len(v) > 1 else None, "min": min(v), "max": max(v),
                "paper": paper, "diff": None if paper is None else ours - paper}


def errors_of(result: dict, dataset: str) -> dict:
    """Test error (%) per metric, from a run's final evaluation."""
    top = {"top1": result.get("final_top1"), "top5": result.get("final_top5")}
    if dataset == "imagenet":
        return {m: 100.0 - v for m, v in top.items() if v is not None}
    return {dataset: 100.0 - top["top1"]} if top["top1"] is not None else {}


def read_run(run_dir: Path, config: str, order: int, paper: dict) -> RunResult | None:
    """The run's result, or None while it has not finished."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    dataset = result["dataset"]
    metrics = DATASET_METRICS.get(dataset, (dataset,))
    return RunResult(network=paper.get("row") or config, config=config, order=order,
                     table=paper.get("table") or "-", seed=result["seed"], run_dir=run_dir,
                     provenance=result, errors=errors_of(result, dataset),
                     paper={m: paper.get(m) for m in metrics if paper.get(m) is not None},
                     paper_statistic=paper.get("statistic", "single"),
                     paper_runs=paper.get("runs", 1))


def group(runs: list[RunResult], split_mixed: bool = False) -> list[Row]:
    """One row per (network, metric); runs of one row must share config digest and commit, or,
    with ``split_mixed``, make rows of their own."""
    rows: dict[tuple, Row] = {}
    for run in sorted(runs, key=lambda r: (r.order, r.seed)):
        for metric in run.errors:
            origin = (run.provenance["config_digest"], run.provenance["commit"])
            key = (run.config, metric) + (origin if split_mixed else ())
            name = run.network
            if split_mixed:
                name += f" [{origin[1][:8]} {origin[0]}]"
            rows.setdefault(key, Row(name, metric)).runs.append(run)
    if not split_mixed:
        for row in rows.values():
            origins = {(r.provenance["config_digest"], r.provenance["commit"]) for r in row.runs}
            if len(origins) > 1:
                listing = "; ".join(f"{r.run_dir} (config {r.provenance['config_digest']}, commit "
                                    f"{r.provenance['commit'][:12]})" for r in row.runs)
                raise MixedRuns(f"{row.network} ({row.metric}): its runs differ in config or "
                                f"commit: {listing}. Run them again in another --out, or show "
                                f"them apart with --split-mixed")
    return list(rows.values())


def describe_mixed(mixed: dict[str, list], short: bool = False) -> str:
    """'commit: a -> b; world_size: 1 -> 2' (commits cut to 12 characters with ``short``)."""
    def show(key, value):
        return str(value)[:12] if short and key == "commit" and value else str(value)
    return "; ".join(f"{key}: {' -> '.join(show(key, v) for v in values)}"
                     for key, values in mixed.items())


def start_warnings(runs: list[RunResult]) -> list[str]:
    """A line per run whose starts differ in commit, config digest, world size or precision."""
    return [f"{run.run_dir}: its starts differ ({describe_mixed(run.mixed, short=True)}); its "
            f"numbers may not be what one start would give"
            for run in sorted(runs, key=lambda r: (r.order, r.seed)) if run.mixed]


def write_csv(runs: list[RunResult], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for run in sorted(runs, key=lambda r: (r.order, r.seed)):
            p = run.provenance
            for metric, value in run.errors.items():
                writer.writerow({
                    "network": run.network, "table": run.table, "metric": metric,
                    "seed": run.seed, "test_error": f"{value:.4f}",
                    "paper": run.paper.get(metric, ""), "config": run.config,
                    "config_digest": p["config_digest"], "commit": p["commit"],
                    "world_size": p["world_size"], "precision": p["precision"],
                    "deterministic": p["deterministic"], "hardware": p["hardware"],
                    "versions": " ".join(f"{k}={v}" for k, v in p["versions"].items()),
                    "starts": len(run.starts) or "", "mixed_starts": describe_mixed(run.mixed),
                    "run_dir": str(run.run_dir)})


def write_summary(rows: list[Row], path: Path) -> None:
    """results_summary.csv: per row of the table (network, metric) the statistics of its
    runs' test errors (%), the paper's number, the statistic and run count it is, and diff =
    ours - paper, ours being the paper's statistic (the mean where it gives a mean, else the
    median)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            s, first = row.stats(), row.runs[0]
            writer.writerow({
                "network": row.network, "table": first.table,
                "dataset": first.provenance["dataset"], "metric": row.metric,
                **{k: "" if s[k] is None else f"{s[k]:.4f}"       # std of one run: none
                   for k in ("median", "mean", "std", "min", "max")},
                "n": s["n"], "paper": "" if s["paper"] is None else s["paper"],
                "paper_statistic": first.paper_statistic, "paper_runs": first.paper_runs,
                "diff": "" if s["diff"] is None else f"{s['diff']:.4f}",
                "mixed_start_runs": sum(1 for r in row.runs if r.mixed), "config": first.config,
                **{k: " ".join(dict.fromkeys(r.provenance[k] for r in row.runs))
                   for k in ("config_digest", "commit")}})


def markdown(rows: list[Row]) -> str:
    """Per paper table: networks down, each metric's median (mean ± std, min-max, n), the
    paper's number and the difference across."""
    tables: dict[str, list[Row]] = {}
    for row in rows:
        tables.setdefault(row.runs[0].table, []).append(row)
    out = ["Test error (%) of the runs' final evaluation: median (mean ± std, min-max) over n "
           "seeds; Δ = ours - paper (median, or mean where the paper gives a mean)."]
    for table, table_rows in tables.items():
        metrics = list(dict.fromkeys(r.metric for r in table_rows))
        networks = list(dict.fromkeys(r.network for r in table_rows))
        cells = {(r.network, r.metric): r for r in table_rows}
        statistics_ = {}
        for r in table_rows:
            first = r.runs[0]
            statistics_.setdefault(METRIC_TITLES.get(r.metric, r.metric), {
                "median": f"median of {first.paper_runs} runs",
                "mean": f"mean of {first.paper_runs} runs", "single": "a single run",
                "unstated": "how many runs is not stated"}[first.paper_statistic])
        statistic = "; ".join(f"{m}: {s}" for m, s in statistics_.items())
        head = ["network"] + [f"{METRIC_TITLES.get(m, m)} {c}" for m in metrics
                              for c in ("ours", "paper", "Δ")] + ["commit", "config"]
        out += ["", f"## Table {table}" if table != "-" else "## Runs",
                f"The paper's numbers: {statistic}.", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for network in networks:
            line, commits, digests = [network], {}, {}
            for metric in metrics:
                row = cells.get((network, metric))
                if row is None:
                    line += ["", "", ""]
                    continue
                s = row.stats()
                line += [f"{s['median']:.2f} ({s['mean']:.2f} ± {fmt(s['std'])}, "
                         f"{s['min']:.2f}-{s['max']:.2f}, n={s['n']})", fmt(s["paper"]),
                         "-" if s["diff"] is None else f"{s['diff']:+.2f}"]
                p = row.runs[0].provenance
                commits[p["commit"][:12]] = digests[p["config_digest"]] = None
            line += [", ".join(commits), ", ".join(digests)]
            out.append("| " + " | ".join(line) + " |")
    mixed = {run.run_dir: run for row in rows for run in row.runs if run.mixed}
    if mixed:
        out += ["", "Runs resumed with another commit, config, world size or precision than they "
                    "started with:", ""]
        out += [f"- {'/'.join(run.run_dir.parts[-3:])}: {describe_mixed(run.mixed, short=True)}"
                for run in mixed.values()]
    return "\n".join(out) + "\n"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = list(dict.fromkeys(r.metric for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 + 1.2 * len(rows) / len(metrics),
                                                      4.2 * 1), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        mine = [r for r in rows if r.metric == metric]
        for x, row in enumerate(mine):
            s = row.stats()
            ax.scatter([x] * len(row.values), row.values, color="tab:blue", alpha=0.6, s=18,
                       label="a seed" if x == 0 else None)
            ax.hlines(s["median"], x - 0.25, x + 0.25, color="tab:blue",
                      label="median" if x == 0 else None)
            if s["paper"] is not None:
                ax.scatter([x], [s["paper"]], marker="*", color="tab:red", s=90,
                           label="paper" if x == 0 else None)
        ax.set_xticks(range(len(mine)), [r.network for r in mine], rotation=30, ha="right",
                     fontsize=8)
        ax.set_title(METRIC_TITLES.get(metric, metric))
        ax.set_ylabel("test error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(runs: list[RunResult], out: Path, split_mixed: bool = False) -> list[Row]:
    rows = group(runs, split_mixed)
    write_csv(runs, out / "results.csv")
    write_summary(rows, out / "results_summary.csv")
    (out / "results.md").write_text(markdown(rows))
    if rows:
        plot(rows, out / "results.png")
    return rows
