"""The trainer end to end: outputs, exact resume (also from a checkpoint of the loop before it had
hooks), divergence, distributed equivalence (gloo on 127.0.0.1) and the DeepSpeed engine. One
process runs in this one (trainer_utils.cli_in_process: train_imagenet.main, its output and
exit code); more, and DeepSpeed, in real processes."""
import json
import shutil

import pytest
import torch

from engine import checkpoint as ckpt
from engine.checkpoint import checkpoint_dir, list_checkpoints, load_file
from devices import PICKED_DEVICES
from trainer_utils import (REPO, base_overrides, epochs, make_folder, nan_loss_at, read_metrics,
                           run_command, run_training, step_losses, train_in_process)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """2 epochs, 1 process, a checkpoint every 2 steps (all kept): the command in a process of
    its own, as a user runs it."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_command(base_overrides(data, out, **{"run.checkpoint_every_steps": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_run_learns_and_writes_every_output(reference_run):
    out, proc = reference_run
    history = epochs(out)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["val_samples"] == 21           # every val image counted once
    assert history[-1]["top1"] > 60, history          # 3 classes: chance is 33%
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert len(step_losses(out)) == 12                # 48 images / batch 8 x 2 epochs
    assert (out / "training_curves.png").stat().st_size > 5000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "config.yaml").is_file() and (out / "train.log").is_file()
    assert "final top-1 / top-5" in proc.stdout       # the summary table
    newest = list_checkpoints(checkpoint_dir(out))[0]
    state = load_file(newest)                          # weights_only=True
    assert state["step"] == 12 and state["epoch"] == 2 and state["format"] == 2
    assert {"model", "optimizer", "scaler", "rng", "history", "step_times"} <= set(state)


@pytest.mark.parametrize("resume_step", [4, 6])  # mid-epoch and exactly at the epoch end
def test_resume_replays_the_same_losses_bitwise(data, reference_run, tmp_path, resume_step):
    out, _ = reference_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    src = out / "checkpoints" / f"step_{resume_step:08d}.pt"
    shutil.copy(src, resumed / "checkpoints" / src.name)
    run_training(base_overrides(data, resumed, **{"run.checkpoint_every_steps": 2}))
    reference, again = step_losses(out), step_losses(resumed)
    assert sorted(again) == list(range(resume_step + 1, 13))
    assert all(again[s] == reference[s] for s in again), (again, reference)
    assert epochs(resumed)[-1] == epochs(out)[-1]


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(data, reference_run, tmp_path):
    out, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run_dir / "checkpoints")
    newest = list_checkpoints(checkpoint_dir(run_dir))[0]
    newest.write_bytes(newest.read_bytes()[:5000])       # truncated
    # as written before checksums existed (with one, the checksum catches it first)
    (newest.parent / (newest.name + ".sha256")).unlink()
    proc = run_training(base_overrides(data, run_dir, **{"train.epochs": 3}))
    assert f"cannot read checkpoint {newest}" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step_00000010.pt" in proc.stdout


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out = tmp_path / "nan"
    proc = run_training(base_overrides(data, out, **{"optim.lr": 1e12,
                                                     "run.checkpoint_every_steps": 1}),
                        check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training loss is" in proc.stderr and "last good checkpoint is" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    good = list_checkpoints(checkpoint_dir(out))
    assert good, "the checkpoint before the divergence must survive"
    state = load_file(good[0])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_modern_recipe_options_run(data, tmp_path):
    out = tmp_path / "modern"
    run_training(base_overrides(data, out, **{
        "train.epochs": 1, "train.ema_decay": 0.9, "train.mixup": 0.2, "train.cutmix": 1.0,
        "train.label_smoothing": 0.1, "schedule.name": "cosine", "schedule.warmup_epochs": 0.5,
        "optim.no_weight_decay_on_bn": True}))
    last = epochs(out)[-1]
    assert "top1_ema" in last and last["val_samples"] == 21
    lrs = [m["lr"] for m in read_metrics(out) if m["type"] == "train"]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[3]       # warmup, then cosine decay


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(data, tmp_path, reference_run):
    """Same global batch 8: 2 ranks x 4 vs 1 process x 2 micro-batches of 4. BatchNorm sees the
    same 4-image groups both ways, so the losses agree to float32 reduction-order noise."""
    two, one = tmp_path / "two", tmp_path / "one"
    extra = {"train.epochs": 1}
    run_training(base_overrides(data, two, **extra), nproc=2)
    run_training(base_overrides(data, one, **extra, **{"train.grad_accum": 2}))
    a, b = step_losses(two), step_losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), (s, a[s], b[s])
    ea, eb = epochs(two)[-1], epochs(one)[-1]
    assert ea["val_samples"] == eb["val_samples"] == 21   # 11 + 10 images, no duplicates
    assert ea["top1"] == pytest.approx(eb["top1"], abs=100 / 21 + 1e-6)


@pytest.mark.slow
def test_deepspeed_zero1_step_equals_ddp_step(data, tmp_path):
    ddp, ds = tmp_path / "ddp", tmp_path / "ds"
    # broadcast: both save rank 0's BN statistics. With reduce (the mean over ranks) they differ
    # by design: DDP copies rank 0's buffers into every rank at each forward, DeepSpeed never
    extra = {"train.epochs": 1, "run.max_steps": 3, "train.dist_bn": "broadcast"}
    run_training(base_overrides(data, ddp, **extra), nproc=2)
    run_training(base_overrides(data, ds, **extra, **{"engine.name": "deepspeed",
                                                      "engine.deepspeed_config": "launch/deepspeed/zero1.json"}),
                 nproc=2)
    a, b = step_losses(ddp), step_losses(ds)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-6), (s, a[s], b[s])
    w_ddp = load_file(list_checkpoints(checkpoint_dir(ddp))[0])["model"]
    w_ds = torch.load(list_checkpoints(checkpoint_dir(ds))[0] / "weights.pt", weights_only=True)["model"]
    for k in w_ddp:
        torch.testing.assert_close(w_ds[k], w_ddp[k], rtol=1e-5, atol=1e-6, msg=k)


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_caught_by_the_checksum(data, reference_run, tmp_path):
    """A checkpoint whose bytes changed after it was written (torch.load may well read it:
    the flip lands in tensor data) is skipped by resume=auto, and refused by name when given
    explicitly."""
    out, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run_dir / "checkpoints")
    newest = list_checkpoints(checkpoint_dir(run_dir))[0]
    assert (newest.parent / (newest.name + ".sha256")).read_text().endswith(f"  {newest.name}\n")
    flip_byte(newest)
    kept = tmp_path / "kept"                 # the resumed run writes step 12 anew over it
    kept.mkdir()
    for f in (newest, newest.parent / (newest.name + ".sha256")):
        shutil.copy(f, kept / f.name)
    proc = run_training(base_overrides(data, run_dir, **{"train.epochs": 3}))
    assert f"{newest}: SHA-256 checksum mismatch" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step_00000010.pt" in proc.stdout
    ckpt.verify(newest)                      # written again from the replayed steps: good
    explicit = tmp_path / "explicit"
    proc = run_training(base_overrides(data, explicit, **{"run.resume": str(kept / newest.name)}),
                        check=False)
    assert proc.returncode == 5 and "SHA-256 checksum mismatch" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_reported_accuracy_is_the_saved_models(data, tmp_path):
    """2 gloo processes, each training on its own half of every batch: BatchNorm statistics
    drift apart per rank. The val loss/top-1 reported at the end equal, exactly up to float
    summation order, a 1-process evaluation of the saved checkpoint; the same for the EMA."""
    import wrn_large
    from engine.config import load_config
    from engine.evaluate import evaluate
    from pipelines import LoaderSpec, build_loader

    out = tmp_path / "two"
    run_training(base_overrides(data, out, **{"train.epochs": 1, "train.ema_decay": 0.5}),
                 nproc=2)
    reported = epochs(out)[-1]
    state = load_file(list_checkpoints(checkpoint_dir(out))[0])
    cfg = load_config(out / "config.yaml")
    loader = build_loader(cfg.data, LoaderSpec("val", batch_size=4))
    for weights, suffix in ((state["model"], ""), (state["ema"], "_ema")):
        model = wrn_large.create_model(cfg.model.name, num_classes=3, **cfg.model.kwargs)
        model.load_state_dict(weights)
        alone = evaluate(model, loader, torch.device("cpu"))
        assert reported[f"top1{suffix}"] == alone["top1"], (suffix, reported, alone)
        assert reported[f"val_loss{suffix}"] == pytest.approx(alone["val_loss"], rel=1e-6), \
            (suffix, reported, alone)


@pytest.mark.slow
def test_deepspeed_checkpoint_manifest_catches_a_flipped_byte(data, tmp_path):
    out = tmp_path / "ds"
    ds = {"engine.name": "deepspeed", "run.checkpoint_every_steps": 2}
    run_training(base_overrides(data, out, **ds, **{"train.epochs": 1}))
    newest = list_checkpoints(checkpoint_dir(out))[0]
    listed = (newest / "MANIFEST.sha256").read_text()
    assert "  weights.pt\n" in listed and "  state/mp_rank_00_model_states.pt\n" in listed
    flip_byte(newest / "state" / "mp_rank_00_model_states.pt")
    proc = run_training(base_overrides(data, out, **ds, **{"run.max_steps": 5}))  # resumed: 1 step
    assert "mp_rank_00_model_states.pt: SHA-256 checksum mismatch" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout


@pytest.mark.parametrize("device", PICKED_DEVICES)
def test_fp16_nan_step_is_skipped_by_the_scaler_not_divergence(data, tmp_path, device):
    out = tmp_path / "fp16"
    run = train_in_process(
        base_overrides(data, out, **{"train.amp": "fp16", "run.checkpoint_every_steps": 1,
                                     "train.compile": "off"}),   # compile: test_gpu_engines
        nan_loss_at({3}))
    trainer = run.trainer
    assert trainer.dist.device.type == device and run.summary["status"] == "finished"
    before, after = (load_file(out / "checkpoints" / f"step_{s:08d}.pt") for s in (2, 3))
    params = [name for name, _ in trainer.model.named_parameters()]
    for name in params:                                 # the step changed nothing it trains
        assert torch.equal(before["model"][name], after["model"][name]), name
    assert before["optimizer"]["state"].keys() == after["optimizer"]["state"].keys()
    for k, v in before["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], after["optimizer"]["state"][k]["momentum_buffer"])
    assert after["scaler"]["scale"] == before["scaler"]["scale"] / 2   # and lowered the scale
    records = {m["step"]: m for m in read_metrics(out) if m["type"] == "train"}
    assert records[3]["loss"] is None and records[3]["skipped"] == 1
    assert all(records[s]["loss"] > 0 for s in records if s != 3)
    # "skipped" marks exactly the steps whose scale went down (gradient overflow may add some)
    scales = [65536.0] + [load_file(out / "checkpoints" / f"step_{s:08d}.pt")["scaler"]["scale"]
                          for s in range(1, 13)]
    assert {s for s, r in records.items() if r.get("skipped")} == \
        {s for s in range(1, 13) if scales[s] < scales[s - 1]}
    changed = load_file(out / "checkpoints" / "step_00000004.pt")["model"]
    assert not torch.equal(changed[params[0]], after["model"][params[0]])   # training went on
    history = epochs(out)
    assert len(history) == 2 and all(h["train_loss"] > 0 for h in history)


def test_fp16_nan_steps_in_a_row_are_divergence(data, tmp_path):
    from engine.errors import TrainingDiverged
    from engine.trainer import MAX_SKIPPED_IN_A_ROW
    out = tmp_path / "fp16"
    with pytest.raises(TrainingDiverged, match=f"for {MAX_SKIPPED_IN_A_ROW} steps in a row"):
        train_in_process(base_overrides(data, out, **{"train.amp": "fp16"}),
                         nan_loss_at(set(range(2, 13))))


def test_nan_without_loss_scaling_is_divergence(data, tmp_path):
    from engine.errors import TrainingDiverged
    with pytest.raises(TrainingDiverged, match="training loss is nan at step 2 "):
        train_in_process(base_overrides(data, tmp_path / "bf16", **{"train.amp": "bf16"}),
                         nan_loss_at({2}))


LEGACY = REPO / "tests" / "fixtures" / "checkpoint_b503558"


def test_a_checkpoint_of_the_loop_before_hooks_resumes_exactly(tmp_path):
    """b503558 (the trainer before the loop was rebuilt around hooks) wrote step 8 of a 12-step
    run with EMA; resumed here, the remaining losses and the final evaluation (EMA included) are
    that run's."""
    reference = json.loads((LEGACY / "reference.json").read_text())
    data, out = make_folder(tmp_path / "data"), tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for f in LEGACY.glob("step_*"):
        shutil.copy(f, out / "checkpoints" / f.name)
    assert "format" not in load_file(out / "checkpoints" / "step_00000008.pt")   # format 1
    overrides = [o.replace("DATA", str(data)).replace("OUT", str(out))
                 for o in reference["overrides"]]
    run = train_in_process(overrides)
    assert "resumed from" in run.log and "step_00000008.pt at step 8 (epoch 1)" in run.log
    got = step_losses(out)
    assert sorted(got) == [9, 10, 11, 12]
    for step, loss in got.items():
        assert loss == pytest.approx(reference["losses"][str(step)], rel=1e-5), step
    last, then = epochs(out)[-1], reference["epochs"][-1]
    for key in ("train_loss", "val_loss", "top1", "val_loss_ema", "top1_ema", "val_samples"):
        assert last[key] == pytest.approx(then[key], rel=1e-5), key
