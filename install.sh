#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the project installed
# (editable) and every dependency, detectron2 included. Safe to re-run: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"

# --test-system (--with-slurm is the same): also the Debian packages the tests run for real:
# slurm-wlm and munge (a throwaway SLURM cluster), fuse and libfuse2 (a file system with a
# parallel file system's latency), libfuse-dev, gcc and pkg-config (its C daemon, which the
# benchmarks use), prometheus (the server that scrapes a run's ranks). Without them those tests
# skip with the reason. Needs root.
if [[ " $* " == *" --test-system "* ]] || [[ " $* " == *" --with-slurm "* ]]; then
    missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm munge)
    { command -v fusermount >/dev/null && ldconfig -p | grep -q libfuse.so.2; } \
        || missing+=(fuse libfuse2)
    { command -v cc >/dev/null && pkg-config --exists fuse 2>/dev/null; } \
        || missing+=(gcc pkg-config libfuse-dev)
    command -v prometheus >/dev/null || missing+=(prometheus)
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
        else
            echo "install.sh: --test-system needs root and apt-get for ${missing[*]}; their tests will skip" >&2
        fi
    fi
fi

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
# detectron2 is not on PyPI under its own name: sal-detectron2 0.7.2 is a wheel of upstream
# detectron2 (commit a59f056). Its wheel is tagged cp310 but is pure Python on the CPU path.
D2_WHEEL=sal_detectron2-0.7.2-cp310-cp310-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

if [ ! -x "$VENV/bin/python" ]; then
    # torch with its CUDA libraries, DALI and DeepSpeed make a ~7 GB environment: say so up front
    # rather than let pip stop half-way with "No space left on device"
    free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
    [ "$free_gb" -ge 8 ] || echo "install.sh: warning: ${free_gb} GB free here;" \
        "the environment in $VENV needs about 7 GB" >&2
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# requirements.lock: every dependency at an exact version with its sha256 (pip-compile; README
# "The lock file" says how to refresh it). It was resolved for Linux x86_64 and Python 3.11;
# elsewhere, or with --no-lock, the ranges of pyproject.toml are installed instead.
platform=$("$PY" -c 'import platform, sys; print(platform.system(), platform.machine(), *sys.version_info[:2])')
if [ "$platform" = "Linux x86_64 3 11" ] && [[ " $* " != *" --no-lock "* ]]; then
    "$PY" -m pip install -q --require-hashes --no-deps -r requirements.lock
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
else
    echo "install.sh: requirements.lock is for Linux x86_64 / Python 3.11 (this is $platform):" \
        "installing pyproject.toml's ranges, not the locked versions" >&2
    "$PY" -m pip install -q "setuptools>=64,<81" wheel
    "$PY" -m pip install -q -e ".[all,test]"
fi

if ! "$PY" -c "import detectron2" 2>/dev/null; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
        --implementation cp -d "$tmp" sal-detectron2==0.7.2
    wheel=$(ls "$tmp"/sal_detectron2-0.7.2-*.whl)
    echo "$D2_SHA256  $wheel" | sha256sum -c --quiet - \
        || { echo "install.sh: sha256 mismatch for $wheel" >&2; exit 1; }
    site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PY" - "$wheel" "$site" <<'PYEOF'
import sys, zipfile
wheel, site = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    # only the detectron2 package: the wheel also ships a top-level `tools` we must not install
    zf.extractall(site, [n for n in zf.namelist() if n.startswith("detectron2/")])
PYEOF
fi
# DeepSpeed compiles its CPU shared-memory all-reduce (deepspeed_shm_comm) on its first run, ~65 s,
# and caches it in ~/.cache/torch_extensions: compile it now rather than in the first run
"$PY" - <<'PYEOF' >/dev/null 2>&1 || echo "install.sh: DeepSpeed's CPU comm op did not build; its first run will try again" >&2
import torch
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
PYEOF
"$PY" -c "import torch, torchvision, timm, nvidia.dali, detectron2, deepspeed, pycocotools, wrn_large" \
    && echo "install.sh: environment ready in $VENV"
