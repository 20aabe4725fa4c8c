"""The one compiled piece: pipelines/_normalize.c (everything else is in pyproject.toml).

Optional: if no C compiler is found the install goes on and pipelines/torch_resize.py uses
torch's ops instead (same values, ~0.1 ms per image slower)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "pipelines._normalize", ["pipelines/_normalize.c"], optional=True,
    # -ffp-contract=off: a multiply then an add, as torch computes them (no fused multiply-add),
    # so the result is bit-identical to torch's
    extra_compile_args=["-O3", "-ffp-contract=off"])])
