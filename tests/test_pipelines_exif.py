"""JPEGs with an EXIF orientation tag: DALI must decode them as PIL/ImageFolder does (raw frame,
no rotation), or the train crop windows computed from the raw size fall outside the image."""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")
from pipelines import DataConfig, LoaderSpec, build_loader  # noqa: E402


def test_dali_ignores_exif_orientation_like_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                img = Image.fromarray(rng.integers(0, 255, (60, 200, 3), dtype=np.uint8))
                exif = Image.Exif()
                exif[0x0112] = 6  # "rotate 90 degrees clockwise on display"
                img.save(folder / f"{c}{i}.JPEG", exif=exif.tobytes())
    cfg = DataConfig(root=str(tmp_path), backend="dali", image_size=32, val_resize=36,
                     min_crop_area=0.08, workers=1)
    torch_cfg = DataConfig(**{**cfg.__dict__, "backend": "torch", "workers": 0})
    for split in ("train", "val"):
        x, y = next(iter(build_loader(cfg, LoaderSpec(split, batch_size=8, seed=1))))
        assert x.shape == (8, 3, 32, 32) and torch.isfinite(x).all()
    dali_val, _ = next(iter(build_loader(cfg, LoaderSpec("val", batch_size=8))))
    torch_val, _ = next(iter(build_loader(torch_cfg, LoaderSpec("val", batch_size=8))))
    # same orientation as PIL, and on the CPU the same resize kernel: equal up to float rounding
    assert (dali_val - torch_val).abs().max() < 1e-4
