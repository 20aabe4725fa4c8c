import os

import pytest
import torch

# Two cores: keep intra-op threads bounded so multi-process tests do not oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches of ours (COCO check verdicts) go to a folder of the test session, not ~/.cache."""
    os.environ.setdefault("WRN_LARGE_CACHE", str(tmp_path_factory.mktemp("wrn_large_cache")))
