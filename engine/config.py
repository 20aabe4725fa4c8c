"""Typed training configuration: YAML files in configs/ plus ``key=value`` overrides.

A file may start from another with ``base: relative/path.yaml`` (recipes live in one file; the
networks trained with it only name what differs). Unknown or mistyped keys are errors that name
the key, the file it came from and the closest valid keys.

Every value is checked as it is read, against its field's type: a closed set is a ``Literal``,
a number's range a ``Range`` (``Count``: 1, 2, ...; pipelines/config.py). ``validate`` then
checks combinations. Registries (``model.name``, ``engine.name``, ``data.backend``) are open
sets, checked where they are built. The paths a run reads are checked by ``check_paths``, which
the commands call: not here, since a checkpoint's saved config is read again on machines where
its data.root does not exist.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml

from pipelines.config import (SMALL_DATASETS, ChoiceOrPath, Count, DataConfig, Fraction,
                              NonNegative, Positive, Range, Size)
from pipelines.read_guard import longest_read_s

REPO_ROOT = Path(__file__).resolve().parent.parent
# A three-way switch. YAML 1.1 reads a bare on/off (and yes/no, true/false) as a boolean, so
# `train.amp=off` arrives as False: _coerce maps booleans back to "on"/"off" for Literal fields.
Switch = Literal["auto", "on", "off"]


@dataclass
class ModelConfig:
    name: str = "wrn18_x1"          # any name of `python -m wrn_large`
    kwargs: dict = field(default_factory=dict)  # builder arguments, e.g. {dropout: 0.3}
    pretrained: str | None = None   # checkpoint file of ours or a torchvision state dict
    pretrained_ema: bool = False    # load the checkpoint's EMA weights instead of the model's


@dataclass
class OptimConfig:
    lr: Positive = 0.1              # learning rate for `lr_batch` images per step
    lr_batch: Count = 256           # linear scaling: lr * global_batch / lr_batch
    momentum: Fraction = 0.9
    dampening: Annotated[float, Range("[0, 1]")] = 0.0
    nesterov: bool = True           # needs momentum > 0 and dampening 0
    weight_decay: NonNegative = 1e-4
    no_weight_decay_on_bn: bool = False  # modern recipes skip wd on BN and biases
    clip_grad_norm: NonNegative = 0.0  # 0 = off (the paper's recipes do not clip)
    # a fresh optimizer (empty momentum buffers) at every lr drop of the step schedule, as the
    # official WRN code (train.lua L182-183, pytorch/main.py L162-164); off: keep the momentum
    fresh_at_lr_drops: bool = False


@dataclass
class ScheduleConfig:
    name: Literal["step", "cosine"] = "step"
    milestones: list = field(default_factory=lambda: [30, 60, 80])  # epochs >= 0 (step)
    gamma: Positive = 0.1           # lr factor at each milestone (step)
    # when milestone m takes effect: after_epochs = after m full epochs (fb.resnet.torch's
    # floor((epoch-1)/30), torch's MultiStepLR); start_of_epoch = when 1-based epoch m starts,
    # so m-1 epochs at the old lr (the official WRN CIFAR/SVHN code: train.lua L174-181)
    milestone_rule: Literal["after_epochs", "start_of_epoch"] = "after_epochs"
    warmup_epochs: NonNegative = 0.0  # linear warmup from warmup_factor * lr
    warmup_factor: Annotated[float, Range("[0, 1]")] = 0.0
    min_lr: NonNegative = 0.0       # floor of the cosine schedule


@dataclass
class TrainConfig:
    epochs: Count = 90
    batch_size: Count = 256         # GLOBAL batch per optimizer step (all processes, all micro-steps)
    # micro-batches per optimizer step (divides batch_size); what sizes the micro-batch when
    # micro_batch is null. The accumulation a start runs with is what its world size leaves
    grad_accum: Count = 1
    # each process's batch per forward pass; null = batch_size / (processes x grad_accum), in an
    # elastic job (launch/torchrun.py --nnodes=MIN:MAX) of the full MAX-node job at any size:
    # a restart at another world size changes the accumulation instead (engine/membership.py)
    micro_batch: Count | None = None
    label_smoothing: Fraction = 0.0
    mixup: NonNegative = 0.0        # timm Mixup alpha (0 = off)
    cutmix: NonNegative = 0.0       # timm CutMix alpha (0 = off)
    ema_decay: Fraction = 0.0       # 0 = no EMA; e.g. 0.9998 (timm ModelEmaV3)
    # auto = what suits the device: see "Precision and speed switches" in docs/switches.md
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, off on the CPU
    channels_last: Switch = "auto"  # auto: on with CUDA, off on the CPU
    compile: Switch = "auto"        # auto: torch.compile on with CUDA, off on the CPU
    seed: Size = 0
    deterministic: bool = False     # deterministic algorithms (cuDNN, cuBLAS); off: cudnn.benchmark
    # BatchNorm statistics (model and EMA) made equal on all ranks before every evaluation and
    # checkpoint: reduce = mean over ranks (timm's default: every rank's batches count),
    # broadcast = rank 0's
    dist_bn: Literal["reduce", "broadcast"] = "reduce"
    # no progress on any rank for this long: name the stuck rank, write every live rank's
    # stacks to RUN_DIR/hang_*.txt and exit 75 so torchrun restarts from the last checkpoint
    # (engine/watchdog.py; launch/README.md); 0 = off. Above any healthy step, evaluation
    # batch or checkpoint of the shipped recipes
    hang_timeout_s: NonNegative = 900.0
    # a rank whose forward or data wait over a logging interval is this many times the median
    # rank's is named in the log as a straggler (0 = off)
    straggler_factor: Annotated[float, Range("(1, inf)", off=0)] = 1.5


@dataclass
class EngineConfig:
    name: str = "ddp"               # ddp | deepspeed
    deepspeed_config: str = "launch/deepspeed/zero1.json"  # used by engine=deepspeed
    zero_stage: Literal[0, 1, 2, 3] | None = None  # overrides the JSON's stage when set
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, else gloo


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    # where checkpoints go: a folder or s3://bucket/prefix (credentials: the AWS variables);
    # null = <output_dir>/checkpoints. Logs, TensorBoard and metrics stay in output_dir
    checkpoint_dir: str | None = None
    # auto (newest valid checkpoint in checkpoint_dir) | none | PATH | s3://.../step_N.pt
    resume: Annotated[str, ChoiceOrPath(("auto", "none"), "a checkpoint")] = "auto"
    checkpoint_every_steps: Size = 0  # 0 = only at the end of each epoch
    keep_checkpoints: Count = 3
    # write checkpoints in a thread while training goes on (the loop stalls for a host copy);
    # off: the loop waits for each write (engine/checkpoint_writer.py). DeepSpeed: always waits
    async_checkpoint: bool = True
    eval_every_epochs: Count = 1
    log_every_steps: Count = 20
    progress: bool = True           # progress bar on rank 0
    max_steps: Size = 0             # stop (with a checkpoint) after this many optimizer steps; 0 = off
    # where rank 0 writes the run's figures (engine/metrics.py, engine/trackers.py): jsonl,
    # tensorboard, mlflow (MLFLOW_TRACKING_URI), wandb (WANDB_MODE=offline without a network)
    loggers: list = field(default_factory=lambda: ["jsonl", "tensorboard"])
    # every rank's health for Prometheus (engine/hooks/prometheus.py): rank r serves on this port
    # + its local rank; 0 = free ports, listed in RUN_DIR/prometheus_targets.json (file_sd);
    # null = no exporter
    prometheus_port: Annotated[int, Range("[0, 65535]")] | None = None


ErrorPercent = Annotated[float, Range("[0, 100]")]  # a test error in %


@dataclass
class PaperConfig:
    """The paper's number for this config, which reproduce.py sets ours beside: test error in %
    on the config's data.dataset (cifar10, cifar100, svhn) or ImageNet top-1/top-5 error."""
    table: str | None = None        # e.g. "6"
    row: str | None = None          # the row's label there, e.g. "WRN-28-10, dropout 0.3"
    cifar10: ErrorPercent | None = None
    cifar100: ErrorPercent | None = None
    svhn: ErrorPercent | None = None
    top1: ErrorPercent | None = None
    top5: ErrorPercent | None = None
    runs: Count = 1                 # the runs the paper's statistic is over
    statistic: Literal["median", "mean", "single", "unstated"] = "single"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)


PAPER_METRICS = ("cifar10", "cifar100", "svhn", "top1", "top5")


class ConfigError(ValueError):
    pass


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else f" Valid keys: {', '.join(valid)}."


def _coerce(value: Any, tp, where: str):
    """Check (and gently convert) a YAML value to the field's annotated type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _coerce_choice(value, typing.get_args(tp), where)
    if origin is Annotated:                      # a type and what its values must be (Range)
        kind, *rules = typing.get_args(tp)
        if isinstance(value, bool) and any(isinstance(r, ChoiceOrPath) for r in rules):
            value = "on" if value else "off"     # YAML's reading of a bare on/off
        value = _coerce(value, kind, where)
        for rule in rules:
            problem = rule.problem(value)
            if problem:
                raise ConfigError(f"{where}: {problem}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
            value = float(value)                 # YAML 1.1 reads 5e-4 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp in (list, dict) or origin in (list, dict):
        if isinstance(value, origin or tp):
            return value
        raise ConfigError(f"{where}: expected a {(origin or tp).__name__}, got {value!r}")
    return value


def _coerce_choice(value: Any, choices: tuple, where: str) -> str:
    if isinstance(value, bool):  # YAML's reading of a bare on/off
        value = "on" if value else "off"
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def _apply(obj, values: dict, where: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj), include_extras=True)
    fields = _fields(type(obj))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {dotted!r}.{_suggest(key, fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {dotted!r} is a section; give keys under it")
            _apply(current, value, where, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}: {dotted}"))


def find_config(path: str | os.PathLike) -> Path:
    """A config path as given, or relative to the repository (so any cwd works)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def yaml_error_place(e: yaml.YAMLError) -> str:
    """' at line L, column C: what', one line (PyYAML's own message spans several)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None:
        return f": {e}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml_chain(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """[(file, values)] from the deepest ``base:`` to ``path`` itself."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base:' chain")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a config file: it is binary (a YAML recipe such as "
                          f"configs/quickstart.yaml is meant; a checkpoint goes to "
                          f"model.pretrained or run.resume)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML{yaml_error_place(e)}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    base = values.pop("base", None)
    chain = read_yaml_chain(find_config(path.parent / base) if not Path(base).is_absolute()
                            else Path(base), seen + (path.resolve(),)) if base else []
    return chain + [(path, values)]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.epochs=10)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    cfg = Config()
    if path is not None:
        for file, values in read_yaml_chain(find_config(path)):
            _apply(cfg, values, str(file))
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("model.kwargs."):  # free-form builder arguments
            cfg.model.kwargs[key.split(".", 2)[2]] = value
            continue
        _apply(cfg, nest(key, value), "command line")
    validate(cfg)
    return cfg


def config_from_dict(values: dict, where: str) -> Config:
    """The config a run saved (``config.yaml``, a checkpoint's ``config``), checked as a file."""
    cfg = Config()
    _apply(cfg, values, where)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """The first combination of values that no data or machine can make right, as an error
    (each value alone was checked as it was read)."""
    problem = next(combination_problems(cfg), None)
    if problem:
        raise ConfigError(problem)


def combination_problems(cfg: Config) -> Iterator[str]:
    t, o, paper = cfg.train, cfg.optim, cfg.paper
    if t.batch_size % t.grad_accum:
        yield f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
    if t.micro_batch is not None and t.batch_size % t.micro_batch:
        yield (f"train.batch_size={t.batch_size} is not divisible by "
               f"train.micro_batch={t.micro_batch}")
    if o.nesterov and (o.momentum == 0 or o.dampening != 0):
        yield (f"optim.nesterov=true needs optim.momentum > 0 and optim.dampening=0 (they are "
               f"{o.momentum:g} and {o.dampening:g}); or optim.nesterov=false")
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) and m >= 0
               for m in cfg.schedule.milestones):
        yield f"schedule.milestones={cfg.schedule.milestones}: epochs, numbers >= 0"
    if cfg.model.pretrained_ema and not cfg.model.pretrained:
        yield "model.pretrained_ema=true needs model.pretrained: the checkpoint whose EMA to load"
    if (paper.statistic in ("median", "mean")) == (paper.runs == 1):
        yield (f"paper.runs={paper.runs} with paper.statistic={paper.statistic}: "
               "'single' (and 'unstated') is one run, 'median'/'mean' are over more")
    read_s = longest_read_s(cfg.data.read_timeout_s)
    if t.hang_timeout_s and cfg.data.read_timeout_s and t.hang_timeout_s <= read_s:
        yield (f"train.hang_timeout_s={t.hang_timeout_s:g} must exceed the longest a read may take "
               f"before it is given up on ({read_s:g} s with data.read_timeout_s="
               f"{cfg.data.read_timeout_s:g}): the watchdog would end the job, and each restart, "
               f"on a file that data.on_bad_image would skip")
    data = cfg.data.problem()
    if data:
        yield data


URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_paths(cfg: Config, training: bool = True) -> None:
    """The first path the run reads that is not there, as an error. The commands call it after
    reading the config (train_imagenet.py, its --eval-only with ``training=False``, reproduce.py);
    ``load_config`` does not, since a checkpoint's saved config is read again (predict, export)
    on machines where its data.root no longer exists."""
    problem = next(path_problems(cfg, training), None)
    if problem:
        raise ConfigError(problem)


def path_problems(cfg: Config, training: bool = True) -> Iterator[str]:
    d = cfg.data
    reads_data = d.backend != "synthetic"
    if reads_data and d.root is not None:
        problem = data_root_problem(d.root)
        if problem:
            yield problem
    elif reads_data and d.dataset in SMALL_DATASETS:
        yield (f"data.dataset={d.dataset} has no built-in data set: set data.root to the folder "
               f"of its files (pipelines/README.md)")
    if d.file_list is not None and reads_data:
        for split in ("train", "val") if training else ("val",):
            path = d.file_list.replace("{split}", split)
            if URL.match(path) or not os.path.isfile(path):
                yield (f"data.file_list={d.file_list}: no file {path} (`python -m pipelines "
                       f"verify DATA_DIR` writes the clean lists)")
    pretrained = cfg.model.pretrained
    if pretrained is not None:
        if is_s3_url(pretrained):
            pass                        # looked up before training (engine/build.py probe_storage)
        elif URL.match(pretrained):
            yield (f"model.pretrained={pretrained}: a URL; a local checkpoint file or an "
                   f"s3://bucket/key is meant")
        elif os.path.isdir(pretrained):
            yield (f"model.pretrained={pretrained} is a folder; a checkpoint file is meant (a "
                   f"DeepSpeed checkpoint's weights: {Path(pretrained) / 'weights.pt'})")
        elif not os.path.exists(pretrained):
            yield f"model.pretrained: checkpoint not found: {pretrained}"
    if not training:
        return
    resume = cfg.run.resume
    if resume not in ("auto", "none") and not is_s3_url(resume) and \
            (URL.match(resume) or not os.path.exists(resume)):
        yield f"run.resume={resume}: no such checkpoint"
    ckpt_dir = cfg.run.checkpoint_dir
    if ckpt_dir and URL.match(ckpt_dir) and not is_s3_url(ckpt_dir):
        yield f"run.checkpoint_dir={ckpt_dir}: a local folder or s3://bucket/prefix is meant"
    ds = cfg.engine.deepspeed_config
    if cfg.engine.name == "deepspeed" and not any(p.is_file() for p in (Path(ds), REPO_ROOT / ds)):
        yield f"engine.deepspeed_config={ds}: no such file (here or under {REPO_ROOT})"


def is_s3_url(location: str) -> bool:
    return location.lower().startswith("s3://") and len(location) > len("s3://")


def data_root_problem(root: str) -> str | None:
    """What makes ``data.root`` unreadable, or None: the data source that reads it decides
    (pipelines/sources.py, no torch: a local path must exist and suit its source; a URL needs a
    source registered for its scheme)."""
    from pipelines.sources import root_problem
    problem = root_problem(root)
    return f"data.root: {problem}" if problem and "data.root" not in problem else problem


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike, provenance: dict | None = None) -> None:
    """The resolved config; ``provenance`` (engine/provenance.py) heads it as comments."""
    head = ""
    if provenance:
        head = "".join(f"# {key}: {value}\n" for key, value in provenance.items()
                       if key != "versions")
        head += "# versions: " + ", ".join(f"{k} {v}" for k, v in provenance["versions"].items()) + "\n"
    Path(path).write_text(head + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def schema_keys(obj=None, prefix: str = ""):
    """(dotted key, default, annotated type) of every leaf of the schema, in order."""
    obj = obj if obj is not None else Config()
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from schema_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, hints[f.name]


def describe_keys() -> list[str]:
    """Every key with its default and, where the schema closes them, its allowed values, for
    --list-keys: ``train.amp='auto'  # auto | off | bf16 | fp16``."""
    lines = []
    for key, value, tp in schema_keys():
        allowed = allowed_values(tp)
        lines.append(f"{key}={value!r}" + (f"  # {allowed}" if allowed else ""))
    return lines


def allowed_values(tp) -> str:
    """``auto | off | bf16 | fp16``, ``>= 1``, ``in (0, 1]``; '' for an open type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    if origin is Annotated:
        return ", ".join(str(rule) for rule in typing.get_args(tp)[1:])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        parts = [allowed_values(a) for a in args if a is not type(None)]
        return " | ".join(parts + ["null"] * (type(None) in args)) if all(parts) else ""
    return ""
