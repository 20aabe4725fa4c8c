"""The commands under bench/ in their tiny modes (``--tiny``: the smallest data that takes each
one's path), run as a user runs them, so that a benchmark that breaks fails here. The
assertions are on what each prints or writes (its table, ratios and JSON parse, the numbers are
positive, every row is there), never on the timings.
bench/gpu_check.py runs in test_gpu_check.py (its --dry-run)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from latency_fs import fuse_unavailable
from pipelines.pack import is_pack
from trainer_utils import REPO

LOADERS = ["dali-cpu", "dali-cpu-torch-ops", "dali-cpu-dali-resize", "torch-pil",
           "torch-decode_jpeg", "dali-decode", "raw-decode"]
if torch.cuda.is_available():
    LOADERS.insert(1, "dali-mixed")
NUMBER = r"(\d+(?:\.\d*)?(?:e-?\d+)?)"


def bench(script: str, *args: str) -> str:
    """``python bench/SCRIPT ARGS`` from the repository, as a user types it; its stdout."""
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def table_after(out: str, header: str) -> list[list[str]]:
    """The rows (split on whitespace) of the table under the line that starts with ``header``."""
    lines = out[out.index("\n" + header) + 1:].splitlines()[1:]
    return [line.split() for line in lines if line.strip()]


def markdown_rows(out: str) -> dict[str, list[str]]:
    """``| name | a | b |`` rows under a ``| --- |`` line: name -> [a, b]."""
    rows = out[out.index("| --- |"):].splitlines()[1:]
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in row.strip().strip("|").split("|")] for row in rows if row.strip())}


def positive(values) -> bool:
    values = list(values)
    return bool(values) and all(float(v) > 0 for v in values)


@pytest.fixture
def needs_dali():
    pytest.importorskip("nvidia.dali")


def test_input_pipeline_tiny_prints_every_loader(tmp_path, needs_dali):
    out = bench("input_pipeline.py", "--tiny", "--data", str(tmp_path / "jpegs"),
                "--json", str(tmp_path / "out.json"))
    rows = {row[0]: row[1:] for row in table_after(out, "loader ")}
    assert list(rows) == LOADERS
    for name, (img_s, x_torch_pil, x_raw, rss, mib) in rows.items():
        assert positive([img_s, x_torch_pil, x_raw, rss]) and mib == "MiB", (name, rows[name])
    assert rows["torch-pil"][1] == rows["raw-decode"][2] == "1.00"
    report = json.loads((tmp_path / "out.json").read_text())
    assert list(report["summary"]) == LOADERS and len(report["rounds"]) == 1
    for name, summary in report["summary"].items():
        assert positive(summary.values()), (name, summary)
    for name, measured in report["rounds"][0].items():   # one epoch of the 24 images each
        assert measured["name"] == name and measured["images"] == 24, measured
        assert positive([measured["seconds"], measured["img_s"], measured["peak_rss_mib"]])


def test_input_pipeline_tiny_latency_mode_prints_every_case(tmp_path, needs_dali):
    why = fuse_unavailable("c")  # the benchmark's FUSE daemon, tests/latency_fs.c
    if why:
        pytest.skip(f"FUSE unavailable: {why}")
    out = bench("input_pipeline.py", "--tiny", "--latency-ms", "2", "--data",
                str(tmp_path / "jpegs"), "--json", str(tmp_path / "out.json"))
    assert len(re.findall(r"^  round 0: ", out, re.M)) == 2 * 2 * 3
    rows = table_after(out, "loader     layout")
    assert [row[:2] for row in rows] == [["dali-cpu", "folder"], ["dali-cpu", "pack"],
                                         ["torch-pil", "folder"], ["torch-pil", "pack"]]
    for row in rows:   # img/s local, 0 ms, 2 ms; ratios 0 ms/local, 2 ms/local
        assert len(row) == 7 and positive(row[2:]), row
    summary = json.loads((tmp_path / "out.json").read_text())["summary"]
    assert list(summary) == [f"{loader} {layout}" for loader in ("dali-cpu", "torch-pil")
                             for layout in ("folder", "pack")]
    for case in summary.values():
        assert list(case["img_s"]) == ["local", "0 ms", "2 ms"] and positive(case["img_s"].values())
        assert list(case["ratio_to_local"]) == ["0 ms", "2 ms"]
        assert positive(case["ratio_to_local"].values())
    assert is_pack(tmp_path / "jpegs_pack")   # made beside the folder


def test_listing_startup_tiny_prints_each_start(tmp_path, needs_dali):
    why = fuse_unavailable()  # the virtual tree is served by the fusepy daemon
    if why:
        pytest.skip(f"FUSE unavailable: {why}")
    out = bench("listing_startup.py", "--tiny", "--json", str(tmp_path / "out.json"))
    line = re.compile(rf"^(walk|cold cache|warm cache) +64 samples: listing +{NUMBER} s, first "
                      rf"batch +{NUMBER} s, to the first batch +{NUMBER} s \(imports {NUMBER} s\)$")
    printed = [line.match(text) for text in out.strip().splitlines()]   # (to 0.1 s: can be 0.0)
    assert all(printed) and [m[1] for m in printed] == ["walk", "cold cache", "warm cache"], out
    results = json.loads((tmp_path / "out.json").read_text())
    assert list(results) == ["walk", "cold cache", "warm cache"]
    for case in results.values():
        assert case.pop("samples") == 64 and positive(case.values()), case


def test_checkpoint_io_tiny_prints_its_tables(tmp_path):
    out = bench("checkpoint_io.py", "--tiny", "--stall", "--s3", "--dir", str(tmp_path))
    size = re.search(rf"^wrn_40_1: checkpoint of {NUMBER} GB .*, median of 1$", out, re.M)
    assert size and float(size[1]) > 0, out
    out, stall = out.split("\nwrn_40_1: the loop's stall per save")
    stall_rows = markdown_rows(stall)           # synchronous vs background, disk and S3
    assert list(stall_rows) == ["local disk", "S3 (moto)"], stall
    assert all(len(cells) == 5 and positive(cells) for cells in stall_rows.values()), stall
    rows = markdown_rows(out)
    assert list(rows) == ["save (torch.save + fsync + SHA-256 + rename)", "SHA-256 alone",
                          "verify (re-read + SHA-256)", "load (torch.load, weights_only)"]
    for name, (seconds, s_per_gb) in rows.items():
        assert positive([seconds, s_per_gb]), (name, seconds, s_per_gb)
    assert (tmp_path / "step_00000001.pt").is_file()   # written where --dir says


def test_coco_scale_tiny_prints_every_step(tmp_path):
    pytest.importorskip("detectron2")
    pytest.importorskip("pycocotools")
    out = bench("coco_scale.py", "--tiny", "--out", str(tmp_path / "out.json"))
    steps = ["our check, cold (child process)", "our check, cached (a second job)",
             "pycocotools COCO()", "detectron2 load_coco_json",
             "train_net, check + load + 2 iterations"]
    rows = markdown_rows(out)
    assert list(rows) == steps
    for name, (seconds, peak, child_peak) in rows.items():
        assert positive([seconds, peak]) and (child_peak == "-" or float(child_peak) >= 0), name
    assert re.search(r"^detectron2 load_coco_json .* 12$", out, re.M), out   # all 12 images
    results = json.loads((tmp_path / "out.json").read_text())
    assert [r["step"] for r in results] == steps
    assert all(positive([r["seconds"], r["peak_gb"]]) for r in results), results


def test_trainer_step_tiny_prints_both_loops_and_their_ratio():
    """The loop's own step (run_step, with its checks) beside a bare PyTorch loop."""
    out = bench("trainer_step.py", "--tiny")
    rates = dict(re.findall(rf"^\s*(bare|trainer): median\s+{NUMBER} img/s", out, re.M))
    assert set(rates) == {"bare", "trainer"} and positive(rates.values()), out
    ratio = re.search(rf"ratio trainer/bare: median {NUMBER}", out)
    assert ratio and float(ratio.group(1)) > 0, out


def test_s3_input_tiny_prints_each_source_and_its_ratio():
    out = bench("s3_input.py", "--tiny")
    assert re.search(r"^24 files of 2 KB in \d+ shard\(s\) .* 20 ms per S3 request", out, re.M), out
    rows = markdown_rows(out)
    assert list(rows) == ["local", "s3", "s3+cache", "local/shards", "s3/shards cold",
                          "s3/shards cold 0ms"]
    assert all(positive(values) for values in rows.values()), rows
    assert rows["local"][1] == "1.000"
