"""bench/gpu_check.py's CPU-side logic: arguments, the report files, the refusal without CUDA
(its measurements run on a GPU machine: `python bench/gpu_check.py`)."""
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
               dali_img_s=1900.0, dali_over_synthetic=0.95, peak_memory_gb=20.5)
    report = {"gpu": "a GPU", "tests": {"returncode": 0, "summary": "12 passed"},
              "models": [row, {**row, "model": "wrn18_x2", "dali_over_synthetic": 0.99}],
              "dali_alone": {"batch": 256, "img_s": 5000.0, "peak_memory_gb": 1.25}}
    out = tmp_path / "gpu_report.json"
    gpu_check.write_report(report, out)
    assert json.loads(out.read_text()) == report
    table = (tmp_path / "gpu_report.md").read_text()
    assert "| " + " | ".join(gpu_check.COLUMNS) + " |" in table
    assert "| wrn34_x2 | 256 | on | 2000 | 1900 | 0.950 | 20.5 |" in table
    assert "DALI/synthetic below 0.97: wrn34_x2 (compile on)" in table
    assert "wrn18_x2 (compile" not in table.split("below")[1]
    assert "5000 img/s at batch 256" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the command measures")
def test_without_cuda_it_says_so_and_exits_3(capsys):
    assert gpu_check.main([]) == 3
    assert "no CUDA device" in capsys.readouterr().err
