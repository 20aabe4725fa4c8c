"""Packed data sets (``python -m pipelines pack``), read-ahead and the listing cache.

The pack is checked against what defines its format, not against our own reader: DALI's
``wds2idx`` must write the same index, DALI's ``fn.readers.webdataset`` and the ``webdataset``
library must read every sample back."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from pipelines import DataConfig, LoaderSpec, build_loader
from pipelines import folder as folder_module
from pipelines.sources import open_samples
from pipelines.pack import INDEX, PackError, layout_order, load_pack, pack
from pipelines.read_ahead import ReadAhead
from pipeline_data import write_jpeg_folder
from trainer_utils import REPO, base_overrides, make_folder, run_training, step_losses

pytest.importorskip("pipelines.dali")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = write_jpeg_folder(tmp_path_factory.mktemp("src"), per_class=7, size=(120, 90))
    # names a pack must carry: a dot in the stem, an upper-case extension, a PNG
    shutil.copy(root / "train" / "a_cls" / "a_cls_000.JPEG", root / "train" / "a_cls" / "x.v2.jpeg")
    from PIL import Image
    Image.new("RGB", (40, 30), (9, 99, 199)).save(root / "train" / "c_cls" / "flat.png")
    return root


@pytest.fixture(scope="module")
def packed(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("pack") / "out"
    counts = pack(str(source), str(out), shard_mb=0, progress=False)  # one sample per shard...
    assert counts == {"train": (23, 23), "val": (21, 21)}
    return out


@pytest.fixture(scope="module")
def packed_in_two(source, tmp_path_factory):
    """Shards of ~50 KB: a few samples each."""
    out = tmp_path_factory.mktemp("pack2") / "out"
    pack(str(source), str(out), shard_mb=0.05, progress=False)
    return out


def test_pack_keeps_every_file_byte_for_byte_in_the_folder_order(source, packed):
    for split in ("train", "val"):
        folder, pk = open_samples(source, split, listing_cache="off"), load_pack(packed, split)
        assert pk.classes == folder.classes and pk.labels == folder.labels
        for i in range(len(folder)):
            assert pk.read(i) == folder.read(i), folder.describe(i)
    train = load_pack(packed, "train")
    assert train.describe(0).endswith(f"shard-{train.shard[0]:06d}.tar:a_cls/a_cls_000.jpg")
    assert (packed / "classes.tsv").read_text().splitlines()[1:] == [
        "0\ta_cls\t", "1\tb_cls\t", "2\tc_cls\t"]


def test_pack_asks_the_file_system_for_each_files_metadata_once(source, tmp_path, monkeypatch):
    """On a parallel file system each stat is a round trip to a metadata server."""
    import os
    stats: dict[str, int] = {}
    real_stat = os.stat

    def counting(path, *a, **kw):
        if str(path).lower().endswith((".jpeg", ".jpg", ".png")):
            stats[str(path)] = stats.get(str(path), 0) + 1
        return real_stat(path, *a, **kw)
    monkeypatch.setattr(os, "stat", counting)
    pack(str(source), str(tmp_path / "out"), shard_mb=0.05, progress=False)
    assert len(stats) == 23 + 21 and set(stats.values()) == {1}, stats


def test_index_files_are_what_dalis_wds2idx_writes(packed_in_two):
    from wds2idx import IndexCreator
    shards = sorted((packed_in_two / "train").glob("*.tar"))
    assert 1 < len(shards) < 23
    for shard in shards:
        reference = shard.with_name(shard.stem + ".ref")
        with IndexCreator(str(shard), str(reference), verbose=False) as creator:
            creator.create_index()
        assert shard.with_suffix(".idx").read_text() == reference.read_text(), shard


def expected_samples(source, split):
    folder = open_samples(source, split, listing_cache="off")
    return sorted((folder.read(i), folder.labels[i]) for i in range(len(folder)))


def test_dalis_webdataset_reader_reads_the_pack(source, packed_in_two):
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def
    shards = sorted((packed_in_two / "train").glob("*.tar"))

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read():
        image, png, label = fn.readers.webdataset(
            paths=[str(s) for s in shards], index_paths=[str(s.with_suffix(".idx")) for s in shards],
            ext=["jpg", "png", "cls"], missing_component_behavior="empty")
        return image, png, label

    pipe = read()
    pipe.build()
    got = []
    for _ in range(23):
        image, png, label = (np.array(out[0]) for out in pipe.run())
        data = image if image.size else png
        got.append((data.tobytes(), int(label.tobytes().decode())))
    assert sorted(got) == expected_samples(source, "train")


def test_webdataset_library_reads_the_pack(source, packed_in_two):
    webdataset = pytest.importorskip("webdataset")
    for split in ("train", "val"):
        urls = [str(s) for s in sorted((packed_in_two / split).glob("*.tar"))]
        got = [(s.get("jpg", s.get("png")), int(s["cls"])) for s in webdataset.WebDataset(
            urls, shardshuffle=False)]
        assert sorted(got) == expected_samples(source, split)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loaders_give_the_folders_batches_from_its_pack(source, packed, backend):
    for split in ("train", "val"):
        batches = []
        for root in (source, packed):
            cfg = DataConfig(root=str(root), backend=backend, image_size=32, val_resize=36,
                             workers=0 if backend == "torch" else 1, read_ahead=4)
            loader = build_loader(cfg, LoaderSpec(split, batch_size=4, rank=1, world_size=2, seed=3))
            loader.set_epoch(2)
            batches.append(list(loader))
        assert len(batches[0]) == len(batches[1]) > 1
        for (a, la), (b, lb) in zip(*batches):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_the_mixed_layout_puts_every_class_in_each_shard_and_keeps_the_index(
        source, packed_in_two, tmp_path):
    """The default layout writes the samples in a fixed random order: each shard holds the
    classes in proportion (a shard of the folder's order holds one or two), the index is the
    folder's, and the same input packs the same bytes again. ``--layout source`` keeps the
    index order, and a pack begun with one layout is not finished with the other."""
    mixed, by_source = load_pack(packed_in_two, "train"), None
    assert mixed.layout == "mixed"
    pack(str(source), str(tmp_path / "source"), shard_mb=0.05, progress=False, layout="source")
    by_source = load_pack(tmp_path / "source", "train")
    assert by_source.layout == "source" and (np.diff(by_source.shard) >= 0).all()
    assert by_source.labels == mixed.labels
    assert not (np.diff(mixed.shard) >= 0).all()        # not in index order
    labels = np.array(mixed.labels)

    def classes_per_shard(samples):
        return [len(set(labels[samples.shard == k])) for k in range(len(samples.shards))]
    assert np.mean(classes_per_shard(mixed)) > np.mean(classes_per_shard(by_source))
    for i in range(len(mixed)):
        assert mixed.read(i) == by_source.read(i)
    pack(str(source), str(tmp_path / "again"), shard_mb=0.05, progress=False)
    for shard in mixed.shards:
        assert (tmp_path / "again" / "train" / shard).read_bytes() == \
            (packed_in_two / "train" / shard).read_bytes()
    with pytest.raises(PackError, match="begun with --layout source: finish it with --layout "
                                        "source"):
        pack(str(source), str(tmp_path / "source"), shard_mb=0.05, progress=False)
    # the order is pinned: a resumed pack finds its first run's shards where it puts them
    assert layout_order("mixed", 20).tolist() == [16, 18, 15, 8, 11, 14, 10, 6, 2, 7, 5, 17, 3,
                                                  1, 12, 9, 13, 4, 19, 0]


def test_a_pack_written_before_layouts_reads_as_source_and_is_finished_as_one(source, tmp_path):
    out = tmp_path / "old"
    pack(str(source), str(out), shard_mb=0.05, progress=False, layout="source")
    manifest = json.loads((out / "pack.json").read_text())
    del manifest["layout"]
    (out / "pack.json").write_text(json.dumps(manifest))
    with np.load(out / "train" / INDEX) as z:
        np.savez(out / "train" / INDEX, **{k: z[k] for k in z.files if k != "layout"})
    assert load_pack(out, "train").layout == "source"
    (out / "val" / INDEX).unlink()                                  # a partial pack
    with pytest.raises(PackError, match="begun with --layout source"):
        pack(str(source), str(out), shard_mb=0.05, progress=False)
    pack(str(source), str(out), shard_mb=0.05, progress=False, layout="source")
    assert load_pack(out, "val").layout == "source"


def test_pack_resumes_after_the_last_complete_shard(source, packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    shards = sorted((out / "val").glob("*.tar"))
    shards[-1].with_suffix(".idx").unlink()                  # killed while writing the last shard
    shards[-1].rename(shards[-1].with_name(shards[-1].name + ".tmp"))
    (out / "val" / INDEX).unlink()
    before = {p: p.stat().st_mtime_ns for p in shards[:-1]}
    pack(str(source), str(out), shard_mb=0, progress=False)
    assert {p: p.stat().st_mtime_ns for p in shards[:-1]} == before  # not written again
    for split in ("train", "val"):
        for name in sorted(p.name for p in (packed / split).iterdir()):
            if name != INDEX:
                assert (out / split / name).read_bytes() == (packed / split / name).read_bytes()
        a, b = load_pack(out, split), load_pack(packed, split)
        assert (a.offset == b.offset).all() and (a.shard == b.shard).all()


def test_a_partial_pack_is_refused_by_the_loader(packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed, out)
    (out / "train" / INDEX).unlink()
    with pytest.raises(FileNotFoundError, match="partial pack"):
        build_loader(DataConfig(root=str(out), backend="dali"), LoaderSpec("train", batch_size=2))


def test_pack_refuses_partial_input_and_another_packs_folder(source, packed, tmp_path):
    no_val = tmp_path / "no_val"
    shutil.copytree(source / "train", no_val / "train")
    with pytest.raises(PackError, match="no val/"):
        pack(str(no_val), str(tmp_path / "o1"), progress=False)
    shutil.copytree(source / "train", no_val / "val")
    (no_val / "val" / "b_cls").mkdir(exist_ok=True)
    for f in (no_val / "val" / "b_cls").iterdir():
        f.unlink()
    with pytest.raises(PackError, match="without images: b_cls"):
        pack(str(no_val), str(tmp_path / "o2"), progress=False)
    listed = tmp_path / "list_{split}.txt"
    for split in ("train", "val"):
        (tmp_path / f"list_{split}.txt").write_text("a_cls/a_cls_000.JPEG 0\na_cls/gone.JPEG 0\n"
                                                    "b_cls/b_cls_000.JPEG 1\nc_cls/c_cls_000.JPEG 2\n")
    with pytest.raises(PackError, match="1 listed file.* missing .*gone.JPEG"):
        pack(str(source), str(tmp_path / "o3"), file_list=str(listed), progress=False)
    assert not (tmp_path / "o3").exists()  # refused before anything is written
    other = tmp_path / "other"
    shutil.copytree(source, other)
    (other / "train" / "a_cls" / "a_cls_001.JPEG").unlink()
    with pytest.raises(PackError, match="holds a pack of another input"):
        pack(str(other), str(packed), shard_mb=0, progress=False)


def test_pack_command_and_verify_name_a_corrupt_member(source, packed, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "pipelines", "pack", str(source), str(out),
                          "--shard-mb", "1", "--no-progress"], cwd=REPO, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert "train: 23 images in 1 shard(s)" in run.stdout
    verify = [sys.executable, "-m", "pipelines", "verify", str(out), "--no-progress", "--workers", "1"]
    ok = subprocess.run(verify, cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "train: 23 good, 0 bad" in ok.stdout, ok.stdout + ok.stderr
    pk = load_pack(out, "train")
    with open(out / "train" / pk.shards[0], "r+b") as f:   # zero the second image's scan data
        f.seek(int(pk.offset[1]) + 600)
        f.write(bytes(int(pk.size[1]) - 600))
    bad = subprocess.run(verify, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "BAD  " in bad.stdout and "shard-000000.tar:a_cls/a_cls_001.jpg" in bad.stdout
    missing = subprocess.run([sys.executable, "-m", "pipelines", "pack", str(tmp_path / "nope"),
                              str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")
    assert "Traceback" not in missing.stderr


def test_read_ahead_keeps_order_and_a_bounded_number_of_reads(tmp_path):
    lock, state = threading.Lock(), {"started": 0, "consumed": 0, "most": 0}

    def read(i):
        with lock:
            state["started"] += 1
            state["most"] = max(state["most"], state["started"] - state["consumed"])
        time.sleep(0.002)
        return bytes([i % 256])

    got = []
    for data in ReadAhead(read, 8)(range(200)):
        got.append(data[0])
        with lock:
            state["consumed"] += 1
        time.sleep(0.0005)
    assert got == [i % 256 for i in range(200)]
    assert state["most"] <= 8 + 1, state   # at most depth reads ahead of the consumer

    def failing(i):
        if i == 5:
            raise FileNotFoundError(f"sample {i}")
        return b"x"
    reader = ReadAhead(failing, 4)(range(10))
    assert [next(reader) for _ in range(5)] == [b"x"] * 5
    with pytest.raises(FileNotFoundError, match="sample 5"):  # raised where sample 5 is due
        next(reader)


def test_listing_cache_is_reused_until_a_directory_changes(tmp_path, monkeypatch):
    root = write_jpeg_folder(tmp_path / "d", per_class=2, size=(16, 16))
    cache = str(tmp_path / "cache")
    first = open_samples(root, "train", listing_cache=cache)
    walks = []
    real_walk = folder_module.walk_folder
    monkeypatch.setattr(folder_module, "walk_folder", lambda f: walks.append(f) or real_walk(f))
    again = open_samples(root, "train", listing_cache=cache)
    assert walks == [] and again.files == first.files and again.labels == first.labels
    time.sleep(0.01)
    shutil.copy(root / "train" / "b_cls" / "b_cls_000.JPEG", root / "train" / "b_cls" / "new.JPEG")
    third = open_samples(root, "train", listing_cache=cache)
    assert len(walks) == 1 and "b_cls/new.JPEG" in third.files
    assert open_samples(root, "train", listing_cache="off").files == third.files


@pytest.fixture(scope="module")
def trainer_data(tmp_path_factory):
    data = make_folder(tmp_path_factory.mktemp("folder"))
    out = tmp_path_factory.mktemp("pack") / "pack"
    pack(str(data), str(out), shard_mb=1, progress=False)
    return data, out


@pytest.mark.slow
def test_training_from_a_pack_equals_training_from_its_folder_and_resumes(trainer_data, tmp_path):
    data, packed = trainer_data
    every = {"run.checkpoint_every_steps": 2, "data.backend": "dali", "data.workers": 1}
    run_training(base_overrides(data, tmp_path / "folder", **every))
    run_training(base_overrides(packed, tmp_path / "pack", **every))
    reference, from_pack = step_losses(tmp_path / "folder"), step_losses(tmp_path / "pack")
    assert sorted(from_pack) == list(range(1, 13)) and from_pack == reference
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "pack" / "checkpoints" / "step_00000004.pt", resumed / "checkpoints")
    run_training(base_overrides(packed, resumed, **every))   # mid-epoch 1 of 2
    again = step_losses(resumed)
    assert sorted(again) == list(range(5, 13))
    assert all(again[s] == reference[s] for s in again), (again, reference)


def test_batch_reads_follow_the_batches_asked_for_whatever_was_predicted():
    """A worker's stream predicts batches w, w+W, ...; asked for others (or for indices outside
    the schedule), it must still return exactly the files asked for."""
    from pipelines.torch_backend import BatchReads
    reads = BatchReads(lambda i: b"%d" % i if i != 13 else open("/nonexistent/13", "rb"), 4)
    order = list(range(40))[::-1]
    reads.schedule(order, 5)
    for batch in (0, 1, 2, 5, 3, 3, 7):          # in order, skipping, repeating
        indices = order[batch * 5:(batch + 1) * 5]
        got = reads(indices)
        assert got[:1] == [b"%d" % indices[0]]
        assert [g if isinstance(g, bytes) else 13 for g in got] == \
            [b"%d" % i if i != 13 else 13 for i in indices]
    assert isinstance(reads(order[25:30])[1], FileNotFoundError)   # 13: the error, in place
    assert reads([3, 1, 2]) == [b"3", b"1", b"2"]                   # not a scheduled batch
