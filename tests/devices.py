"""Device parameters: a test runs on the CPU here and on CUDA in the GPU tier (`pytest -m gpu`)."""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", id="cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])

# for code that is given its device (a loader's LoaderSpec.device): both where CUDA exists
DEVICES = ["cpu", CUDA]

# for code that picks its device itself (the trainer: CUDA wherever it exists)
PICKED_DEVICES = [pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
    HAS_CUDA, reason="the trainer picks CUDA here: the cuda case runs instead")), CUDA]


def torch_device(name: str) -> torch.device:
    return torch.device("cuda", 0) if name == "cuda" else torch.device("cpu")


def cuda_case(*values, id: str | None = None):
    """A parametrize case whose last value is "cuda", in the GPU tier (skipped without CUDA)."""
    return pytest.param(*values, "cuda", marks=CUDA.marks,
                        id=id or "-".join(map(str, (*values, "cuda"))))
