"""Where samples come from (``pipelines.sources``): a folder, a file list, a pack, and a URL
only ever read by the source that owns its scheme, never as a local path."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelines import DataConfig, LoaderSpec, build_loader
from pipelines import sources
from pipelines.folder import Samples as FolderSamples
from pipelines.pack import PACK_JSON, PackedSamples, pack
from pipelines.sources import Source, open_samples, root_problem
from pipeline_data import write_jpeg_folder
from trainer_utils import REPO


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_jpeg_folder(tmp_path_factory.mktemp("src"), per_class=3, size=(32, 24))
    packed = tmp_path_factory.mktemp("pack") / "out"
    pack(str(root), str(packed), shard_mb=1, progress=False)
    return root, packed


def python(code: str, cwd=REPO, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_open_samples_picks_the_source_of_each_root(data, tmp_path):
    root, packed = data
    folder, pk = open_samples(root, "train", listing_cache="off"), open_samples(packed, "train")
    assert type(folder) is FolderSamples and type(pk) is PackedSamples
    assert isinstance(folder, sources.Samples) and isinstance(pk, sources.Samples)
    assert pk.labels == folder.labels and pk.read(4) == folder.read(4)
    listed = tmp_path / "{split}.txt"
    (tmp_path / "train.txt").write_text("b_cls/b_cls_001.JPEG 1\n")
    through_list = open_samples(root, "train", file_list=str(listed))   # the folder, listed
    assert type(through_list) is FolderSamples and through_list.read(0) == folder.read(4)
    with pytest.raises(ValueError, match="data.file_list does not apply to the pack"):
        open_samples(packed, "train", file_list=str(listed))


def test_a_url_is_read_by_the_source_of_its_scheme_and_never_as_a_path(data, tmp_path,
                                                                        monkeypatch):
    root, _ = data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gs:" / "bucket" / "train").mkdir(parents=True)   # a local folder named "gs:"
    with pytest.raises(ValueError, match=r"no data source reads gs:// URLs \(sources: pack, "
                                         r"folder, s3 \(s3://\)\)"):
        open_samples("gs://bucket", "train")
    assert root_problem("gs://bucket/data").startswith("no data source reads gs:// URLs")
    with pytest.raises(ValueError, match="no data source reads gs://"):
        build_loader(DataConfig(root="gs://bucket", backend="torch"), LoaderSpec("train", 2))
    with pytest.raises(ValueError, match="read from a local folder, not a s3:// URL"):
        build_loader(DataConfig(root="s3://bucket", dataset="cifar10"), LoaderSpec("train", 2))

    # a new source is one registration: its scheme's URLs are its own, checked by it
    opened = []
    memory = Source("memory", schemes=("mem",),
                    open=lambda url, split, **options: opened.append((url, split)) or
                    open_samples(root, split, listing_cache="off"),
                    problem=lambda url: None if url.endswith("/ok") else f"{url}: no such store")
    monkeypatch.setitem(sources._sources, "memory", memory)
    assert len(open_samples("mem://store/ok", "val")) == 9 and opened == [("mem://store/ok", "val")]
    assert root_problem("mem://store/ok") is None
    assert root_problem("mem://elsewhere") == "mem://elsewhere: no such store"
    assert "sources: pack, folder, s3 (s3://), memory (mem://)" in root_problem("gs://bucket")
    with pytest.raises(ValueError, match="mem:// is read by the memory source already"):
        sources.register_source(Source("other", open=print, schemes=("mem",)))


def test_root_problem_without_listing_anything(data, tmp_path):
    root, packed = data
    assert root_problem(None) is None                       # the built-in default data set
    assert root_problem(str(root)) is None and root_problem(str(packed)) is None
    assert root_problem(str(tmp_path / "nope")) == f"data.root={tmp_path / 'nope'} does not exist"
    (tmp_path / "file").write_text("")
    assert root_problem(str(tmp_path / "file")) == (f"data.root={tmp_path / 'file'} is a file, "
                                                    f"not a folder")
    old = tmp_path / "old_pack"
    old.mkdir()
    (old / PACK_JSON).write_text('{"format": 0}')
    assert "pack format 0" in root_problem(str(old))
    (old / PACK_JSON).write_text("{")
    assert "cannot be read as a pack's manifest" in root_problem(str(old))


def test_sources_import_no_torch_and_no_circle():
    """sources imports folder, pack and s3_pack; pack imports folder; none imports sources;
    boto3 is imported on the first object store request, not before."""
    proc = python("import sys, pipelines.sources as s\n"
                  "assert 'torch' not in sys.modules, 'torch'\n"
                  "assert 'boto3' not in sys.modules, 'boto3'\n"
                  "print(s.root_problem('gs://b/k'))")
    assert proc.returncode == 0 and "no data source reads gs://" in proc.stdout, proc.stderr
    for module, not_imported in (("folder", ("pack", "sources")), ("pack", ("sources",)),
                                 ("s3_pack", ("sources",))):
        proc = python(f"import sys, pipelines.{module}\n"
                      f"print([m for m in {not_imported!r} if 'pipelines.' + m in sys.modules])")
        assert proc.returncode == 0 and proc.stdout.strip() == "[]", (module, proc.stdout,
                                                                       proc.stderr)


def test_pack_refuses_a_url_in_one_line_and_writes_nothing(data, tmp_path):
    root, _ = data
    proc = python("", tmp_path, "-m", "pipelines", "pack", root, "gs://bucket/pack")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: gs://bucket/pack: pack writes a local folder or an s3:// URL, not gs://"]
    assert list(tmp_path.iterdir()) == []                   # no local folder named "gs:"
    proc = python("", tmp_path, "-m", "pipelines", "pack", "s3://bucket/data", tmp_path / "out")
    assert proc.returncode == 2 and "pack reads a local folder" in proc.stderr
    assert list(tmp_path.iterdir()) == []
