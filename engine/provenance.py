"""What a run's numbers came from: the commit, the config's digest, the seed, the world size, the
precision, the hardware and the versions of what it imported. Rank 0 writes it at the start of a
run (``provenance.json``) and again, with the final metrics, when the run finishes
(``result.json``: its presence is what ``reproduce.py`` takes for "this run is done")."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from .config import REPO_ROOT, Config, to_dict

PACKAGES = ("torch", "torchvision", "nvidia-dali-cuda120", "deepspeed", "timm", "numpy",
            "pillow", "onnx", "onnxruntime", "detectron2", "pycocotools")
# keys that name where or how verbosely a run goes, not what it computes; the seed is a run's own
NOT_IN_DIGEST = {"run": ("output_dir", "resume", "progress", "log_every_steps", "keep_checkpoints"),
                 "train": ("seed",), "paper": None}


def config_digest(values: dict) -> str:
    """sha256 (first 12 hex) of a config's values as a run computes with them, seed excluded:
    the runs of one row of a table share it."""
    kept = {}
    for section, keys in values.items():
        if section in NOT_IN_DIGEST and NOT_IN_DIGEST[section] is None:
            continue
        drop = NOT_IN_DIGEST.get(section, ())
        kept[section] = {k: v for k, v in values[section].items() if k not in drop} \
            if isinstance(values[section], dict) else values[section]
    text = yaml.safe_dump(kept, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def git_commit(repo: Path = REPO_ROOT) -> str:
    """HEAD's hash, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def hardware(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}"


def provenance(cfg: Config, world_size: int, device, precision: str) -> dict:
    values = to_dict(cfg)
    return {"commit": git_commit(), "config_digest": config_digest(values), "model": cfg.model.name,
            "dataset": cfg.data.dataset, "seed": cfg.train.seed, "world_size": world_size,
            "precision": precision, "deterministic": cfg.train.deterministic,
            "hardware": hardware(device), "versions": versions()}


def write_json(path: Path, values: dict) -> None:
    from .checkpoint import write_text_atomic
    write_text_atomic(path, json.dumps(values, indent=2) + "\n")
