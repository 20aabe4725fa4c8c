"""bench/gpu_check.py on the CPU: arguments, the report files, the refusal without CUDA, and the
whole command in its dry run (its measurements run on a GPU machine: `python bench/gpu_check.py`)."""
import json
import sys

import pytest
import torch

from trainer_utils import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402


def test_quick_and_full_plans():
    quick = gpu_check.parse_args(["--quick"])
    assert quick.models == ["wrn18_x2"] and quick.compile == ["off"]
    assert quick.tests == "gpu and not slow"
    full = gpu_check.parse_args([])
    assert full.models == list(gpu_check.MODELS) and full.compile == ["off", "on"]
    assert full.tests == "gpu"
    assert gpu_check.parse_args(["--models", "wrn34_x2"]).models == ["wrn34_x2"]


def test_report_files_and_the_dali_target(tmp_path):
    row = dict(model="wrn34_x2", batch=256, compile="on", synthetic_img_s=2000.0,
               dali_img_s=1900.0, dali_over_synthetic=0.95, peak_device_memory_gb=22.25,
               peak_torch_memory_gb=20.5)
    report = {"gpu": "a GPU", "tests": {"returncode": 0, "summary": "12 passed"},
              "models": [row, {**row, "model": "wrn18_x2", "dali_over_synthetic": 0.99}],
              "dali_alone": {"batch": 256, "img_s": 5000.0, "peak_device_memory_gb": 1.25},
              "dali_alone_plain_upsampling": {"batch": 256, "img_s": 5500.0}}
    out = tmp_path / "gpu_report.json"
    gpu_check.write_report(report, out)
    assert json.loads(out.read_text()) == report
    table = (tmp_path / "gpu_report.md").read_text()
    assert "| " + " | ".join(gpu_check.COLUMNS) + " |" in table
    assert "| wrn34_x2 | 256 | on | 2000 | 1900 | 0.950 | 22.2 | 20.5 |" in table
    assert "DALI/synthetic below 0.97: wrn34_x2 (compile on)" in table
    assert "wrn18_x2 (compile" not in table.split("below")[1]
    assert "5000 img/s at batch 256, peak device memory 1.25 GB (NVML)" in table
    assert "0.909x the throughput of nvJPEG's own (5500 img/s without it)" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the command measures")
def test_without_cuda_it_says_so_and_exits_3(capsys):
    assert gpu_check.main([]) == 3
    assert "no CUDA device" in capsys.readouterr().err


def test_the_timed_window_lies_inside_one_epoch(tmp_path):
    """DALI's loader is built once per epoch: the JPEGs are linked under more names until one
    epoch holds the warm-up and the timed batches, and a window that does not fit is refused."""
    from input_pipeline import files_of
    from pipeline_data import write_jpeg_folder
    root = write_jpeg_folder(tmp_path / "jpegs", per_class=4, splits=("train",))
    bigger = gpu_check.epoch_of(root, 50)
    assert len(files_of(bigger)) == 50 and gpu_check.epoch_of(root, 5) == root
    assert {p.stat().st_ino for p in files_of(bigger)} == {p.stat().st_ino for p in files_of(root)}
    assert gpu_check.epoch_of(root, 50) == bigger            # made once
    with pytest.raises(ValueError, match="fewer than"):
        gpu_check.images_per_s(lambda x, y: None, iter([(torch.zeros(2), None)] * 4), 3,
                               gpu_check.Target(dry_run=True))


def test_the_dry_run_goes_through_every_measurement_on_the_cpu(tmp_path):
    """``--dry-run``: the command as a GPU session runs it (the trainer's step, the DALI
    loader, the report), on the CPU and small; only the CUDA calls are left out."""
    import subprocess
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--skip-tests",
                           "--models", "wrn_16_4", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["gpu"].startswith("none: a dry run") and "--dry-run" in report["command"]
    (row,) = report["models"]
    assert row["model"] == "wrn_16_4" and row["batch"] == 4
    assert row["synthetic_img_s"] > 0 and row["dali_img_s"] > 0
    assert row["peak_device_memory_gb"] is None
    assert report["dali_alone"]["img_s"] > 0 and report["dali_alone_plain_upsampling"]["img_s"] > 0
    assert "| wrn_16_4 | 4 | off |" in (tmp_path / "report.md").read_text()
