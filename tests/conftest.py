import os

import pytest
import torch

from trainer_utils import THREADS

# keep intra-op threads bounded so multi-process tests (and xdist's workers) do not oversubscribe
torch.set_num_threads(THREADS)

# Files whose tests wait on real processes (SLURM, torchrun, a real-scale COCO file) go first:
# under the README's `pytest -n 2 --dist loadfile` each file runs whole on one worker, and the
# longest ones starting first leave none running alone at the end. In order, longest first
# (--no-loadscope-reorder keeps it: by default xdist sorts files by their number of tests).
SLOW_FIRST = ("test_slurm.py", "test_fault_tolerance.py", "test_quarantine.py",
              "test_detection_coco_scale.py", "test_reproduce.py", "test_trackers.py",
              "test_prometheus.py", "test_cuda_defaults_on_cpu.py",
              "test_trainer.py", "test_s3_data.py", "test_read_faults.py", "test_detection_train.py",
              "test_bench.py", "test_timm.py", "test_listings.py", "test_checkpoint_ranks.py",
              "test_checkpoint_s3.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: in-file order kept


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches of ours (COCO check verdicts) go to a folder of the test session, not ~/.cache."""
    os.environ.setdefault("WRN_LARGE_CACHE", str(tmp_path_factory.mktemp("wrn_large_cache")))
