"""Checkpoints under ``run.checkpoint_dir=s3://...``, against a real S3 server (moto's, as a
process; tests/s3_server.py's proxy in front of it where a fault is injected): save, resume
with the uninterrupted losses, an upload cut before its manifest, a manifest that does not
match, retention, one job per prefix, the probe's one-line errors, credentials never in the run
directory, and the one manifest of a DeepSpeed directory staged by several ranks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from pipelines import object_store
from s3_server import fault_proxy, make_bucket, moto_server, s3_env, using_env
from trainer_utils import REPO, THREADS, base_overrides, make_folder, run_training, step_losses

pytestmark = pytest.mark.slow
BUCKET = "checkpoints"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's server with the fault proxy in front; the environment points at the proxy."""
    tmp = tmp_path_factory.mktemp("s3")
    with moto_server(tmp) as moto, fault_proxy(moto.url, tmp=tmp) as proxy:
        env = s3_env(proxy.url)
        make_bucket(env, BUCKET)
        yield env, proxy


@pytest.fixture
def env(s3):
    env, proxy = s3
    proxy.set_faults([])
    with using_env(env):
        yield env


def state(step: int) -> dict:
    return {"model": {"w": torch.full((64,), float(step))}, "step": step}


def save(folder: str, step: int) -> str:
    url = ckpt.checkpoint_path(folder, step, ".pt")
    ckpt.save_file_atomic(state(step), url, checksum=True)
    return url


def change_one_byte(url: str) -> None:
    data = bytearray(object_store.read(url))
    data[-10] ^= 0xFF
    object_store.write(url, bytes(data))          # a direct put: the manifest is left as it was


# ------------------------------------------------------------------ the store, in process
def test_the_manifest_is_written_last_and_a_checkpoint_without_one_does_not_exist(env, s3,
                                                                                 tmp_path):
    folder = f"s3://{BUCKET}/store"
    _, proxy = s3
    url = save(folder, 1)
    puts = [p for p in proxy.stats()["puts"] if "/store/" in p]
    assert puts[-1].endswith("step_00000001.pt.sha256"), puts     # after the object's upload
    assert ckpt.list_checkpoints(folder) == [url] and ckpt.is_complete(url)
    ckpt.verify(url)
    assert ckpt.load_file(url, tmp_path / "cache")["step"] == 1   # downloaded, checked, loaded
    # the upload of step 2 cut before its manifest: the proxy refuses the manifest's PUT
    proxy.set_faults([{"method": "PUT", "key": r"step_00000002\.pt\.sha256", "action": "denied",
                       "times": 100}])
    with pytest.raises(OSError, match="access denied"):
        save(folder, 2)
    proxy.set_faults([])
    cut = ckpt.checkpoint_path(folder, 2, ".pt")
    assert object_store.exists(cut) and not ckpt.is_complete(cut)
    assert ckpt.newest_complete(folder) == url


def test_retention_deletes_only_after_the_newer_one_verified(env):
    folder = f"s3://{BUCKET}/retention"
    one, two, three = (save(folder, s) for s in (1, 2, 3))
    ckpt.prune(folder, keep=2)
    assert ckpt.list_checkpoints(folder) == [three, two]
    assert not object_store.exists(ckpt.checksums_of(one))         # the manifest went too
    four = save(folder, 4)
    change_one_byte(four)                   # the newest does not verify: nothing is deleted
    ckpt.prune(folder, keep=2)
    assert ckpt.list_checkpoints(folder) == [four, three, two]
    five = save(folder, 5)
    object_store.write(ckpt.checkpoint_path(folder, 6, ".pt"), b"an upload in flight")
    ckpt.prune(folder, keep=2)
    six = ckpt.checkpoint_path(folder, 6, ".pt")
    assert ckpt.list_checkpoints(folder) == [six, five, four]      # the newer upload is left


def test_one_job_per_prefix_and_a_restart_of_the_same_run_takes_the_lock_over(env, tmp_path):
    folder = f"s3://{BUCKET}/locked"
    first = ckpt.PrefixLock(folder, tmp_path / "run")              # then SIGKILLed: never released
    again = ckpt.PrefixLock(folder, tmp_path / "run")              # its restart (same output_dir)
    assert again.token == first.token
    with pytest.raises(RuntimeError) as refused:
        ckpt.PrefixLock(folder, tmp_path / "other")
    message = str(refused.value)
    assert "\n" not in message and folder in message and str(tmp_path / "run") in message
    assert f"delete {folder}/.lock" in message
    again.release()
    ckpt.PrefixLock(folder, tmp_path / "other").release()          # free once released


def test_a_deepspeed_directory_staged_by_two_ranks_gets_one_manifest(env, tmp_path):
    # two ranks on node-local disks: each sees its own shard and the files rank 0 wrote
    seen = [{"state/model.pt": "a", "state/optim_0.pt": "b", "weights.pt": "c"},
            {"state/model.pt": "a", "state/optim_1.pt": "d"}]
    assert ckpt.owned_files(seen, 0) == seen[0]
    assert ckpt.owned_files(seen, 1) == {"state/optim_1.pt": "d"}
    assert sorted(ckpt.merged_checksums(seen)) == ["state/model.pt", "state/optim_0.pt",
                                                   "state/optim_1.pt", "weights.pt"]
    with pytest.raises(ckpt.CheckpointError):
        ckpt.merged_checksums([{"weights.pt": "c"}, {"weights.pt": "x"}])
    staged = tmp_path / "staged"                                  # one process: publish for real
    (staged / "state").mkdir(parents=True)
    (staged / "state" / "model.pt").write_bytes(b"model" * 1000)
    (staged / "weights.pt").write_bytes(b"weights" * 1000)
    url = f"s3://{BUCKET}/deepspeed/step_00000004"
    ckpt.publish_directory(staged, url, is_main=True)
    assert ckpt.list_checkpoints(f"s3://{BUCKET}/deepspeed") == [url] and ckpt.is_complete(url)
    local = ckpt.local_copy(url, tmp_path / "cache")
    assert (local / ckpt.COMPLETE_MARKER).is_file() and (local / "state" / "model.pt").is_file()
    ckpt.verify(local)
    change_one_byte(f"{url}/weights.pt")
    with pytest.raises(ckpt.CheckpointError, match="weights.pt: SHA-256 checksum mismatch"):
        ckpt.verify(url)


def test_a_failed_resave_of_the_same_step_keeps_the_only_checkpoint(env, s3, tmp_path):
    """The epoch's end after a resume at its last step saves that step again: while the new
    object goes up the manifest lists both hashes, so the old object verifies until replaced."""
    _, proxy = s3
    folder = f"s3://{BUCKET}/resave"
    one, four = save(folder, 1), save(folder, 4)
    ckpt.prune(folder, keep=1)
    assert ckpt.list_checkpoints(folder) == [four]
    proxy.set_faults([{"method": "PUT", "key": r"step_00000004\.pt$", "action": "500"}])
    with pytest.raises(OSError):
        ckpt.save_file_atomic({**state(4), "epoch": "again"}, four, checksum=True)
    proxy.set_faults([])
    assert ckpt.newest_complete(folder) == four
    ckpt.verify(four)
    assert ckpt.load_file(four, tmp_path / "cache")["step"] == 4 and "epoch" not in ckpt.load_file(four, tmp_path / "cache")
    ckpt.save_file_atomic({**state(4), "epoch": "again"}, four, checksum=True)   # succeeds
    ckpt.verify(four)
    assert ckpt.load_file(four, tmp_path / "cache")["epoch"] == "again"
    manifest = object_store.read(ckpt.checksums_of(four)).decode()
    assert manifest.count("\n") == 1, manifest                      # the new hash alone
    assert one not in ckpt.list_checkpoints(folder)


def test_a_local_resave_cut_before_its_rename_keeps_the_old_file_verifiable(tmp_path, monkeypatch):
    path = tmp_path / "step_00000004.pt"
    ckpt.save_file_atomic(state(4), path, checksum=True)
    replace = ckpt.os.replace

    def killed_at_the_rename(src, dst):
        if str(dst).endswith(".pt"):
            raise OSError("killed")
        replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_at_the_rename)
    with pytest.raises(OSError, match="killed"):
        ckpt.save_file_atomic({**state(4), "epoch": "again"}, path, checksum=True)
    monkeypatch.undo()
    ckpt.verify(path)                                          # the old bytes, still listed
    ckpt.save_file_atomic({**state(4), "epoch": "again"}, path, checksum=True)
    ckpt.verify(path)
    assert ckpt.load_file(path)["epoch"] == "again"
    assert ckpt.checksum_file(path).read_text().count("\n") == 1


def test_a_failed_retention_is_a_warning_never_a_failed_save(env, s3, tmp_path, caplog):
    from engine.checkpoint_writer import CheckpointWriter
    from engine.hooks import CheckpointHook

    _, proxy = s3
    folder = f"s3://{BUCKET}/prune-denied"
    one, two = save(folder, 1), save(folder, 2)
    proxy.set_faults([{"method": "DELETE", "key": r"step_00000001", "action": "denied"}])
    hook = CheckpointHook(tmp_path, None, keep=1, checkpoint_dir=folder, background=False)
    with caplog.at_level("WARNING"):
        hook.written(two)                                      # the synchronous path's
    proxy.set_faults([])
    assert f"could not remove old checkpoint {one}" in caplog.text
    assert ckpt.is_complete(two)
    caplog.clear()

    def failing():
        raise RuntimeError("retention broke")

    writer = CheckpointWriter(write=lambda *args, **kwargs: None)   # the background path's
    with caplog.at_level("WARNING"):
        writer.submit({"w": torch.zeros(2)}, "somewhere", after=failing)
        writer.wait()                                           # not a failed write
    assert "retention broke" in caplog.text and writer.written == 1


class ThreadRanks:
    """Two "ranks" as threads of this process, with engine.distributed's collectives done by a
    barrier between them (whose timeout stands for the process group's): a rank left waiting
    in a collective that the other has left fails with BrokenBarrierError after ``timeout``."""

    def __init__(self, timeout: float = 5.0):
        import threading

        self.barrier_ = threading.Barrier(2, timeout=timeout)
        self.local, self.box = threading.local(), [None, None]

    def rank(self) -> int:
        return self.local.rank

    def all_gather_object(self, obj) -> list:
        self.barrier_.wait()
        self.box[self.rank()] = obj
        self.barrier_.wait()
        out = list(self.box)
        self.barrier_.wait()
        return out

    def barrier(self) -> None:
        self.barrier_.wait()

    def run(self, work) -> list:
        import threading

        results = [None, None]

        def one(rank: int) -> None:
            self.local.rank = rank
            try:
                work(rank)
                results[rank] = "ok"
            except Exception as e:  # noqa: BLE001 - the test looks at it
                results[rank] = e

        threads = [threading.Thread(target=one, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return results


def test_a_rank0_failure_while_publishing_a_directory_is_raised_on_every_rank(env, s3,
                                                                               tmp_path,
                                                                               monkeypatch):
    """Rank 0's manifest PUT refused: both ranks raise CheckpointError (none is left in a
    barrier until the collective timeout)."""
    from engine import distributed

    _, proxy = s3
    ranks = ThreadRanks()
    for name in ("all_gather_object", "barrier"):
        monkeypatch.setattr(distributed, name, getattr(ranks, name))
    monkeypatch.setattr(ckpt, "_rank", ranks.rank)
    url = f"s3://{BUCKET}/two-ranks/step_00000002"

    def publish(rank: int) -> None:
        staged = tmp_path / f"rank{rank}"
        (staged / "state").mkdir(parents=True, exist_ok=True)
        (staged / "state" / f"optim_{rank}.pt").write_bytes(b"shard" * 100)
        ckpt.publish_directory(staged, url, rank == 0)

    proxy.set_faults([{"method": "PUT", "key": r"MANIFEST\.sha256", "action": "denied"}])
    results = ranks.run(publish)
    proxy.set_faults([])
    assert all(isinstance(r, ckpt.CheckpointError) for r in results), results
    assert all("writing the manifest failed" in str(r) and "access denied" in str(r)
               for r in results), results
    assert not ckpt.is_complete(url)
    assert ranks.run(publish) == ["ok", "ok"] and ckpt.is_complete(url)    # and without faults
    assert sorted(ckpt.store_for(url).checksums(url)) == ["state/optim_0.pt", "state/optim_1.pt"]


@pytest.mark.parametrize("name", ["weights.pth", "model.bin"])
def test_a_pretrained_file_of_any_name_is_found_and_downloaded(env, tmp_path, name):
    url = f"s3://{BUCKET}/pretrained/{name}"
    ckpt.save_file_atomic(state(7), url, checksum=True)
    assert ckpt.exists(url)                                   # the probe's "no such checkpoint"
    assert not ckpt.store_for(url).is_directory(url)
    local = ckpt.local_copy(url, tmp_path / "cache")
    assert local.is_file() and local.name == name
    ckpt.verify(local)
    assert ckpt.load_file(url, tmp_path / "cache")["step"] == 7
    assert ckpt.store_for(url).is_directory(f"s3://{BUCKET}/pretrained")   # objects under it


@pytest.mark.parametrize("fault", ["notimplemented", "denied"])
def test_a_lock_that_cannot_be_taken_says_what_failed_not_in_use(env, s3, tmp_path, fault):
    """A store without conditional writes (501 NotImplemented: older MinIO/Ceph) or a refused
    lock write: a config error in one line saying so, never "in use" (exit 4)."""
    from engine.build import take_run_dir
    from engine.config import ConfigError
    from engine.distributed import DistInfo

    _, proxy = s3
    folder = f"s3://{BUCKET}/no-conditional-put"
    proxy.set_faults([{"method": "PUT", "key": r"/\.lock$", "action": fault}])
    with pytest.raises(ConfigError) as refused:
        take_run_dir(tmp_path / "run", DistInfo(), folder).after_train()
    proxy.set_faults([])
    message = str(refused.value)
    assert "\n" not in message and "in use" not in message and f"{folder}/.lock" in message
    assert message.startswith("run.checkpoint_dir: ")
    assert {"notimplemented": "does not support conditional writes (If-None-Match: *), so one "
                              "job per prefix cannot be enforced",
            "denied": "access denied"}[fault] in message, message
    take_run_dir(tmp_path / "run", DistInfo(), folder).after_train()   # released: free again


def test_an_upload_is_staged_under_the_run_and_a_fresh_upload_is_not_read_twice(
        env, tmp_path, monkeypatch):
    from engine.hooks import CheckpointHook

    folder = f"s3://{BUCKET}/staged"
    staged_at, upload = [], object_store.upload
    monkeypatch.setattr(object_store, "upload",
                        lambda path, url, **kw: staged_at.append(Path(path)) or upload(path, url,
                                                                                       **kw))
    hook = CheckpointHook(tmp_path / "run", None, checkpoint_dir=folder)
    one = save(folder, 1)
    two = ckpt.checkpoint_path(folder, 2, ".pt")
    hook.writer.submit(state(2), two)                         # as the trainer's writer saves
    hook.writer.wait()
    assert staged_at[-1].is_relative_to(hook.staging), staged_at
    assert list(hook.staging.iterdir()) == []                  # cleaned after
    monkeypatch.setattr(ckpt.S3Store, "verify", lambda self, url: pytest.fail(f"read {url}"))
    ckpt.prune(folder, keep=1, verified=two)                   # trusted: read back by its upload
    assert ckpt.list_checkpoints(folder) == [two] and one != two


# ------------------------------------------------------------------ the trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"), train_per_class=8, val_per_class=2)


def train(data, out, env, **extra):
    with using_env(env):
        return run_training(base_overrides(data, out, **{"run.checkpoint_every_steps": 1,
                                                          "run.keep_checkpoints": 2, **extra}),
                            check=False)


def test_a_run_resumes_from_s3_past_a_cut_upload_and_a_changed_byte(data, s3, tmp_path):
    """Uninterrupted (local) vs stopped at step 4 with its checkpoints on S3, the newest one
    then changed by a byte and a newer one's upload cut before its manifest: the restart skips
    the cut one, falls back past the changed one with a log line, and replays the losses."""
    env, proxy = s3
    proxy.set_faults([])
    reference = tmp_path / "reference"
    assert train(data, reference, env).returncode == 0
    folder, out = f"s3://{BUCKET}/run", tmp_path / "run"
    first = train(data, out, env, **{"run.checkpoint_dir": folder, "run.max_steps": 4})
    assert first.returncode == 0, first.stderr[-3000:]
    with using_env(env):
        names = [ckpt.name_of(p) for p in ckpt.list_checkpoints(folder)]
        assert names == ["step_00000004.pt", "step_00000003.pt"], names   # keep 2
        assert not object_store.exists(f"{folder}/.lock")                # released at the end
        change_one_byte(f"{folder}/step_00000004.pt")
        object_store.write(f"{folder}/step_00000005.pt", b"cut before its manifest")
    assert not (out / "checkpoints").exists()            # nothing of them in output_dir
    again = train(data, out, env, **{"run.checkpoint_dir": folder})
    assert again.returncode == 0, again.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"skipping incomplete checkpoint {folder}/step_00000005.pt" in log
    assert "step_00000004.pt: SHA-256 checksum mismatch" in log and "falling back" in log
    assert f"resumed from {folder}/step_00000003.pt at step 3" in log
    expected, resumed = step_losses(reference), step_losses(out)
    assert len(expected) == 6 and all(resumed[s] == expected[s] for s in expected), \
        (resumed, expected)
    # its S3 checkpoint as another run's model.pretrained (downloaded, checked, loaded)
    other = tmp_path / "pretrained"
    proc = train(data, other, env, **{"model.pretrained": f"{folder}/step_00000006.pt",
                                       "run.max_steps": 1})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (other / "pretrained_cache").is_dir() and step_losses(other)[1] < expected[1]
    # credentials never reach a file of the run directories
    for path in (p for run in (out, other) for p in run.rglob("*") if p.is_file()):
        content = path.read_bytes()
        assert env["AWS_SECRET_ACCESS_KEY"].encode() not in content, path
        assert env["AWS_ACCESS_KEY_ID"].encode() not in content, path


def test_a_writer_killed_before_its_manifest_leaves_no_checkpoint(data, s3, tmp_path):
    """The training process SIGKILLed while its background writer waits on the manifest PUT of
    step 4 (the object uploaded and read back, its manifest held by the proxy): the restart,
    which takes the dead run's lock over, skips step 4 and resumes from step 3 (the first epoch's
    end) with the losses of an uninterrupted run."""
    env, proxy = s3
    proxy.set_faults([])
    reference = tmp_path / "reference"
    assert train(data, reference, env).returncode == 0
    folder, out = f"s3://{BUCKET}/killed", tmp_path / "run"
    overrides = base_overrides(data, out, **{"run.checkpoint_dir": folder,
                                             "run.checkpoint_every_steps": 2,
                                             "run.keep_checkpoints": 2})
    proxy.set_faults([{"method": "PUT", "key": r"killed/step_00000004\.pt\.sha256$",
                       "action": "hold", "ms": 120_000, "times": 1}])
    proc = subprocess.Popen([sys.executable, str(REPO / "train_imagenet.py"), "--config",
                             "configs/quickstart.yaml", *overrides], cwd=REPO,
                            env={**env, "PYTHONPATH": str(REPO),
                                 "OMP_NUM_THREADS": str(THREADS)},   # as the in-process runs
                            start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proxy.stats()["held"] == 0:
            assert proc.poll() is None and time.monotonic() < deadline, \
                "the run ended (or took too long) before its manifest PUT of step 4"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proxy.set_faults([])
    with using_env(env):
        assert object_store.exists(f"{folder}/step_00000004.pt")          # the object, uploaded
        assert not object_store.exists(f"{folder}/step_00000004.pt.sha256")
        assert object_store.exists(f"{folder}/.lock")                     # left by the kill
    again = train(data, out, env, **{"run.checkpoint_dir": folder,
                                     "run.checkpoint_every_steps": 2})
    assert again.returncode == 0, again.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert f"skipping incomplete checkpoint {folder}/step_00000004.pt" in log
    assert f"resumed from {folder}/step_00000003.pt at step 3" in log   # the epoch's end
    expected, resumed = step_losses(reference), step_losses(out)
    assert all(resumed[s] == expected[s] for s in expected), (resumed, expected)


def test_a_second_job_on_the_prefix_is_refused_in_one_line(data, s3, tmp_path):
    env, _ = s3
    folder = f"s3://{BUCKET}/shared"
    with using_env(env):
        holder = ckpt.PrefixLock(folder, tmp_path / "first")       # a live (or killed) job
    proc = train(data, tmp_path / "second", env, **{"run.checkpoint_dir": folder})
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in \
        proc.stderr
    assert folder in proc.stderr and str(tmp_path / "first") in proc.stderr
    with using_env(env):
        holder.release()


@pytest.mark.parametrize("case", ["no credentials", "unknown bucket", "read-only bucket"])
def test_storage_problems_are_one_line_before_training(data, s3, tmp_path, case):
    env, proxy = s3
    env = dict(env)
    folder = f"s3://{BUCKET}/probe"
    if case == "no credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    if case == "unknown bucket":
        folder = "s3://no-such-bucket/probe"
    proxy.set_faults([{"method": "PUT", "action": "denied", "times": 1000}]
                     if case == "read-only bucket" else [])
    out = tmp_path / "run"
    proc = train(data, out, env, **{"run.checkpoint_dir": folder})
    proxy.set_faults([])
    what = {"no credentials": "no AWS credentials", "unknown bucket": "does not exist",
            "read-only bucket": "access denied"}[case]
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and what in line and folder in line, line
    assert not out.exists()                              # before the run directory


def test_deepspeed_on_two_processes_falls_back_past_a_changed_byte_and_replays_its_step(
        data, s3, tmp_path):
    """DeepSpeed ZeRO-1, 2 processes under torchrun (gloo), ``run.checkpoint_dir=s3://...``:
    each rank uploads the files it wrote, rank 0 the one ``MANIFEST.sha256`` last. Stopped at
    step 4, a byte of rank 1's optimizer shard of step 4 changed: the restart falls back to
    step 3 with a log line, and its step 4 is the first run's, bit for bit."""
    env, proxy = s3
    proxy.set_faults([])
    folder, out = f"s3://{BUCKET}/deepspeed", tmp_path / "run"
    ds = {"engine.name": "deepspeed", "engine.deepspeed_config": "launch/deepspeed/zero1.json",
          "run.checkpoint_dir": folder, "run.checkpoint_every_steps": 1,
          "run.keep_checkpoints": 2}
    with using_env(env):
        first = run_training(base_overrides(data, out, **ds, **{"run.max_steps": 4}), nproc=2,
                             check=False)
        assert first.returncode == 0, first.stderr[-3000:]
        names = [ckpt.name_of(p) for p in ckpt.list_checkpoints(folder)]
        assert names == ["step_00000004", "step_00000003"], names
        files = [key for key, _ in object_store.listing(f"{folder}/step_00000004")]
        assert "MANIFEST.sha256" in files, files
        shards = sorted(key for key in files if "optim_states" in key)
        assert len(shards) == 2 and "zero_pp_rank_1" in shards[1], files
        change_one_byte(f"{folder}/step_00000004/{shards[1]}")
        before = step_losses(out)
        again = run_training(base_overrides(data, out, **ds), nproc=2, check=False)
        assert again.returncode == 0, again.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "step_00000004" in log and "falling back" in log, log[-3000:]
    assert f"resumed from {folder}/step_00000003 at step 3" in log, log[-3000:]
    after = step_losses(out)
    assert sorted(after) == list(range(1, 7)) and after[4] == before[4], (before, after)
