"""verify (bad files reported by path, clean lists), corrupt files at run time, the default data
set, and two real processes partitioning every epoch."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipelines import DataConfig, LoaderSpec, build_loader, train_shard_indices
from pipelines.default_data import CLASSES, ensure_default_dataset, generate
from pipelines.pack import pack
from pipelines.torch_backend import CorruptImageError
from devices import cuda_case, torch_device
from pipeline_data import flat_colour_folder, flat_colour_ids, write_jpeg_folder

pytest.importorskip("nvidia.dali")
REPO = Path(__file__).resolve().parent.parent


def corrupt(root: Path) -> dict[str, str]:
    """Three kinds of bad file in train/a_cls; returns {relative path: expected reason word}."""
    folder = root / "train" / "a_cls"
    good = (folder / "a_cls_000.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (folder / "text.JPEG").write_text("<html>not found</html>")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored")
    Image.open(folder / "a_cls_001.JPEG").convert("P").save(folder / "anim.JPEG", format="GIF")
    return {"a_cls/truncated.JPEG": "truncated", "a_cls/text.JPEG": "not an image",
            "a_cls/empty.jpg": "not an image", "a_cls/anim.JPEG": "GIF is not a format DALI"}


def test_verify_reports_bad_files_and_writes_a_clean_list(tmp_path):
    root = write_jpeg_folder(tmp_path / "data", per_class=4)
    bad = corrupt(root)
    out = subprocess.run([sys.executable, "-m", "pipelines", "verify", str(root), "--workers", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 1, out.stderr
    for rel, reason in bad.items():
        line = next(l for l in out.stdout.splitlines() if l.startswith("BAD") and rel in l)
        assert str(root / "train" / rel) in line and reason in line, line
    assert "notes.txt" in out.stdout and "verify train" in out.stderr  # tqdm bar
    lines = (root / "train_clean.txt").read_text().splitlines()
    assert len(lines) == 12 and not any(rel in l for l in lines for rel in bad)
    assert lines[0] == "a_cls/a_cls_000.JPEG 0" and lines[-1] == "c_cls/c_cls_003.JPEG 2"
    assert len((root / "val_clean.txt").read_text().splitlines()) == 12

    # every backend reads only the listed files
    for backend in ("dali", "torch"):
        cfg = DataConfig(root=str(root), backend=backend, workers=0 if backend == "torch" else 1,
                         image_size=32, file_list=str(root / "{split}_clean.txt"))
        loader = build_loader(cfg, LoaderSpec("train", batch_size=4))
        assert loader.num_samples == 12
        assert sum(len(b[1]) for b in loader) == 12


@pytest.mark.parametrize("backend, device", [("dali", "cpu"), ("torch", "cpu"), cuda_case("dali")])
def test_corrupt_file_at_run_time_names_it_and_says_what_to_run(tmp_path, backend, device):
    root = write_jpeg_folder(tmp_path / "data", per_class=4)
    good = (root / "train" / "b_cls" / "b_cls_001.JPEG").read_bytes()
    # truncated mid-scan (an interrupted copy): the header parses, the decoder fails
    (root / "train" / "b_cls" / "b_cls_001.JPEG").write_bytes(good[: len(good) // 2])
    cfg = DataConfig(root=str(root), backend=backend, workers=0 if backend == "torch" else 1,
                     image_size=32, val_resize=36, on_bad_image="stop")
    loader = build_loader(cfg, LoaderSpec("train", batch_size=4, device=torch_device(device)))
    with pytest.raises(Exception) as info:
        list(loader)
    message = str(info.value)
    assert "b_cls_001.JPEG" in message and "python -m pipelines verify" in message, message


def cut_body(path: Path) -> None:
    """The header parses, the scan data stops short."""
    path.write_bytes(path.read_bytes()[:400])


def save_as_gif(path: Path) -> None:
    """PIL (and so ImageFolder) reads it, DALI does not."""
    Image.open(path).convert("P").save(path, format="GIF")


DAMAGES = [(cut_body, ""), (save_as_gif, "GIF is not a format DALI")]


@pytest.mark.parametrize("damage, reason, device", [
    *((d, r, "cpu") for d, r in DAMAGES), *(cuda_case(d, r, id=f"{d.__name__}-cuda") for d, r in DAMAGES)])
def test_dali_decoder_failure_is_explained(tmp_path, damage, reason, device):
    """The DALI error (of libjpeg-turbo on the CPU, nvJPEG on the GPU) is replaced by one naming
    the file and why it fails."""
    root = write_jpeg_folder(tmp_path / "data", per_class=4, splits=("val",))
    damage(root / "val" / "c_cls" / "c_cls_002.JPEG")
    loader = build_loader(DataConfig(root=str(root), backend="dali", workers=1, image_size=32,
                                     val_resize=36, on_bad_image="stop"),
                          LoaderSpec("val", batch_size=3, device=torch_device(device)))
    with pytest.raises(CorruptImageError, match=rf"c_cls_002.JPEG \({reason}"):
        list(loader)


def test_an_unexplained_dali_failure_names_the_files_of_its_batch(tmp_path):
    from pipelines.dali import EpochSource
    from pipelines.sources import open_samples
    root = write_jpeg_folder(tmp_path / "data", per_class=2, splits=("val",))
    source = EpochSource(open_samples(str(root), "val"), [0, 1, 2], batch_size=3)
    next(iter(source))
    error = RuntimeError("Critical error in pipeline:\nError in CPU operator ...\n"
                         "nvImageCodec failure: '#4'\nCurrent pipeline object is no longer valid.")
    message = str(source.explain(error))
    assert "b_cls_000.JPEG" in message and "nvImageCodec failure: '#4'" in message, message
    assert "python -m pipelines verify" in message


def test_default_data_generation_is_learnable_layout_and_idempotent(tmp_path):
    root = generate(tmp_path / "small", train_per_class=3, val_per_class=2)
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(CLASSES)
    files = sorted((root / "val").rglob("*.JPEG"))
    assert len(files) == 20
    with Image.open(files[0]) as im:
        assert im.size == (80, 80) and im.format == "JPEG"
    # same seed, same images: the data set is reproducible
    again = generate(tmp_path / "again", train_per_class=3, val_per_class=2)
    assert (again / "val" / "circle" / "circle_0000.JPEG").read_bytes() == \
        (root / "val" / "circle" / "circle_0000.JPEG").read_bytes()


@pytest.mark.slow
def test_default_dataset_full_size_concurrent_first_use(tmp_path):
    target = tmp_path / "default"
    code = ("import sys; from pipelines.default_data import ensure_default_dataset; "
            "print(ensure_default_dataset(sys.argv[1]))")
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(2)]
    outs = [p.communicate(timeout=240)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [str(target)] * 2
    assert time.time() - t0 < 120
    for split, per_class in (("train", 260), ("val", 50)):
        counts = [len(list((target / split / c).iterdir())) for c in CLASSES]
        assert counts == [per_class] * 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dirs cleaned
    stamp = (target / "val").stat().st_mtime
    assert ensure_default_dataset(str(target)) == str(target)
    assert (target / "val").stat().st_mtime == stamp


WORKER = """
import json, sys
from pipelines import DataConfig, LoaderSpec, build_loader
from pipeline_data import flat_colour_ids
root, rank, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = DataConfig(root=root, backend="dali", workers=1, image_size=32, min_crop_area=0.25)
loader = build_loader(cfg, LoaderSpec("train", batch_size=5, rank=rank, world_size=2, seed=11))
seen = {}
for epoch in range(3):
    loader.set_epoch(epoch)
    seen[epoch] = [i for images, _ in loader for i in flat_colour_ids(images)]
json.dump(seen, open(out, "w"))
"""


@pytest.mark.parametrize("layout", ["folder", "pack"])
@pytest.mark.parametrize("device", ["cpu", cuda_case(id="cuda")])
def test_two_simulated_ranks_partition_an_epoch_and_replay_it_mid_way(tmp_path, device, layout):
    """Rank 0 and rank 1 of one job, in one process: each image once per epoch, in the order
    train_shard_indices gives; set_epoch(e, k) starts at the k-th batch of the same order. The
    same from the folder's pack (python -m pipelines pack)."""
    root = flat_colour_layout(tmp_path, layout)
    cfg = DataConfig(root=str(root), backend="dali", workers=1, image_size=32, min_crop_area=0.25)
    loaders = [build_loader(cfg, LoaderSpec("train", batch_size=5, rank=r, world_size=2, seed=11,
                                            device=torch_device(device))) for r in range(2)]
    for epoch in (0, 1):
        seen = []
        for rank, loader in enumerate(loaders):
            loader.set_epoch(epoch)
            ids = [i for images, _ in loader for i in flat_colour_ids(images)]
            assert ids == train_shard_indices(40, 5, rank, 2, 11, epoch).tolist()
            seen += ids
            loader.set_epoch(epoch, 2)       # a resume after two batches
            assert [i for images, _ in loader for i in flat_colour_ids(images)] == ids[10:]
        assert sorted(seen) == list(range(40))


def flat_colour_layout(tmp_path, layout: str):
    """40 flat-colour JPEGs (``flat_colour_ids``) as a folder, or as that folder's pack."""
    root = flat_colour_folder(tmp_path / "flat", 40)
    if layout == "folder":
        return root
    shutil.copytree(root / "train", root / "val")
    pack(str(root), str(tmp_path / "pack"), shard_mb=1, progress=False)
    return tmp_path / "pack"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "pack"])
def test_two_processes_partition_every_epoch(tmp_path, layout):
    root = flat_colour_layout(tmp_path, layout)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(r),
                               str(tmp_path / f"rank{r}.json")], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
                                   "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(3):
        a, b = seen[0][str(epoch)], seen[1][str(epoch)]
        assert sorted(a + b) == list(range(40)), epoch  # disjoint and covering, every epoch
        for rank, ids in enumerate((a, b)):
            assert ids == train_shard_indices(40, 5, rank, 2, 11, epoch).tolist()
    assert seen[0]["0"] != seen[0]["1"]  # reshuffled each epoch
