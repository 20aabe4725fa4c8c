import math

import pytest

from engine.config import ScheduleConfig
from engine.schedule import lr_at, scaled_lr


def test_linear_scaling():
    assert scaled_lr(0.1, 256, 1024) == pytest.approx(0.4)
    assert scaled_lr(0.1, 128, 128) == 0.1


def test_step_schedule_drops_at_epoch_boundaries():
    cfg = ScheduleConfig(name="step", milestones=[60, 120, 160], gamma=0.2)
    spe = 391
    assert lr_at(60 * spe - 1, 0.1, spe, 200, cfg) == pytest.approx(0.1)
    assert lr_at(60 * spe, 0.1, spe, 200, cfg) == pytest.approx(0.02)
    assert lr_at(120 * spe, 0.1, spe, 200, cfg) == pytest.approx(0.004)
    assert lr_at(199 * spe, 0.1, spe, 200, cfg) == pytest.approx(0.0008)


def test_warmup_then_cosine():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=5, warmup_factor=0.0, min_lr=0.0)
    spe = 100
    assert lr_at(0, 1.0, spe, 100, cfg) == 0.0
    assert lr_at(250, 1.0, spe, 100, cfg) == pytest.approx(0.5)
    assert lr_at(500, 1.0, spe, 100, cfg) == pytest.approx(1.0)
    mid = 500 + (100 * spe - 500) // 2
    assert lr_at(mid, 1.0, spe, 100, cfg) == pytest.approx(0.5, abs=1e-3)
    assert lr_at(100 * spe, 1.0, spe, 100, cfg) == pytest.approx(0.0, abs=1e-9)
    assert all(not math.isnan(lr_at(s, 1.0, spe, 100, cfg)) for s in range(0, 100 * spe, 97))
