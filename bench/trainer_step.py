#!/usr/bin/env python
"""Images/s of the trainer's optimizer step against a bare hand-written PyTorch loop.

Both train the same model on the same in-memory batches; they alternate in rounds (A B A B ...)
so machine noise hits both alike, and the script prints the median ratio trainer/bare. The
trainer side is the real code path: the loop's ``run_step`` (set_lr, DDPEngine.train_step, the
loss summed on the device) with its check (the loss all-reduce and NaN check) every
``--check-every`` steps, as ``run.log_every_steps`` sets it; the bare loop reads its loss every
step (``loss.item()``, as timm's train.py does). On CUDA, --amp bf16 and --channels-last apply
to both sides.

  python bench/trainer_step.py                         # CPU: wrn_16_4 at 32x32, batch 64
  python bench/trainer_step.py --model wrn50_2_bottleneck --size 224 --batch 128 --amp bf16 \\
      --channels-last                                  # GPU
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import wrn_large  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.ddp import DDPEngine  # noqa: E402
from engine.distributed import DistInfo  # noqa: E402
from engine.schedule import Schedule  # noqa: E402
from engine.trainer import Loaders, Trainer  # noqa: E402


def make_batches(n, batch, size, classes, device, channels_last):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, size, size, generator=g).to(device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, classes, (batch,), generator=g).to(device)))
    return out


def build(args, device):
    torch.manual_seed(0)
    model = wrn_large.create_model(args.model, num_classes=args.classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def bare_loop(args, device, batches):
    model = build(args, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16"
           else contextlib.nullcontext())

    def step(x, y):
        with amp:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


class Feed:
    """A loader whose batches are handed to it one at a time (``put``)."""

    num_classes = 0

    def put(self, batch) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def engine_step(model: str, classes: int, device: torch.device, amp: str = "off",
                channels_last: bool = False, compile_: bool = False, check_every: int = 20):
    """The trainer's step on a new model: the loop's ``run_step`` with DDPEngine, its check
    every ``check_every`` steps. Returns step(x, y) (also used by bench/gpu_check.py)."""
    cfg = Config()
    cfg.train.amp = amp
    cfg.train.channels_last = "on" if channels_last else "off"
    cfg.train.compile = "on" if compile_ else "off"
    cfg.optim.weight_decay = 5e-4
    torch.manual_seed(0)
    net = wrn_large.create_model(model, num_classes=classes).to(device)
    engine = DDPEngine(cfg, net, DistInfo(device=device))
    feed = Feed()
    trainer = Trainer(net, engine, Loaders(feed), Schedule(epochs=1, steps_per_epoch=10**9,
                                                           base_lr=0.1),
                      loss_fn=nn.CrossEntropyLoss(), check_every=check_every)
    batches = iter(feed)
    trainer.model.train()

    def step(x, y):
        feed.put((x, y))
        trainer.run_step(batches)

    return step


def timed(step, batches, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x, y in batches:
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="wrn_16_4")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=8, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--check-every", type=int, default=20,
                   help="the trainer's steps between checks (run.log_every_steps)")
    p.add_argument("--tiny", action="store_true",
                   help="seconds, for the test suite: batch 4, 3 steps, 2 rounds, a check every 2")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.steps, args.rounds, args.check_every = 4, 3, 2, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = make_batches(args.steps, args.batch, args.size, args.classes, device,
                           args.channels_last)
    loops = {"bare": bare_loop(args, device, batches),
             "trainer": engine_step(args.model, args.classes, device, args.amp,
                                    args.channels_last, check_every=args.check_every)}
    for step in loops.values():  # warm-up
        timed(step, batches[:2], device)
    rates = {k: [] for k in loops}
    for _ in range(args.rounds):
        for name, step in loops.items():
            rates[name].append(timed(step, batches, device))
    ratios = [t / b for t, b in zip(rates["trainer"], rates["bare"])]
    print(f"device={device} model={args.model} size={args.size} batch={args.batch} "
          f"amp={args.amp} channels_last={args.channels_last} threads={torch.get_num_threads()}")
    for name, r in rates.items():
        print(f"{name:>8}: median {statistics.median(r):8.1f} img/s  (rounds: "
              f"{', '.join(f'{v:.1f}' for v in r)})")
    print(f"ratio trainer/bare: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target >= 0.95")


if __name__ == "__main__":
    main()
