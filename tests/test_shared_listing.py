"""A long folder listing reaches DataLoader workers as a shared memory-mapped file
(pipelines/shared_listing.py), not as a million pickled strings per worker per epoch."""
from __future__ import annotations

import multiprocessing
import pickle

import torch
from torch.utils.data import DataLoader, Dataset

from pipelines import shared_listing
from pipelines.folder import Samples

N = 50_000


def listing(tmp_path) -> Samples:
    files = [f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(N)]
    return Samples(tmp_path, files, [i % 1000 for i in range(N)], [f"n{c:08d}" for c in range(1000)])


def test_a_long_listing_pickles_as_a_path_and_reads_back_the_same(tmp_path):
    samples = listing(tmp_path)
    plain = len(pickle.dumps((samples.files, samples.labels)))
    blob = pickle.dumps(samples)
    assert len(blob) * 100 < plain, (len(blob), plain)   # 1,000 class names remain
    back = pickle.loads(blob)
    assert list(back.files) == samples.files and list(back.labels) == samples.labels
    assert back.files[-1] == samples.files[-1] and back.describe(7) == samples.describe(7)
    assert pickle.dumps(samples) == blob           # written once per listing, not per pickling
    assert len(pickle.dumps(back)) == len(blob)    # and passed on as it came


def test_short_listings_pickle_as_they_are(tmp_path):
    samples = listing(tmp_path)
    short = Samples(tmp_path, samples.files[:100], samples.labels[:100], samples.classes)
    assert pickle.loads(pickle.dumps(short)).files == short.files


class Paths(Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples.files[i], self.samples.labels[i]


def test_forkserver_workers_read_the_shared_listing(tmp_path):
    samples = listing(tmp_path)
    loader = DataLoader(Paths(samples), batch_size=None, num_workers=2,
                        sampler=[0, 1, N - 1, 12_345],
                        multiprocessing_context=multiprocessing.get_context("forkserver"))
    got = list(loader)
    assert got == [[samples.files[i], samples.labels[i]] for i in (0, 1, N - 1, 12_345)]
    assert isinstance(got[0][1], int) and not isinstance(got[0][1], torch.Tensor)


def test_the_shared_copy_goes_with_its_listing(tmp_path):
    import gc
    import os
    samples = listing(tmp_path)
    pickle.dumps(samples)
    folder = samples._shared_folder
    assert os.path.isdir(folder)
    del samples
    gc.collect()
    assert not os.path.exists(folder)
    assert shared_listing.SHARE_FROM <= N


def test_copies_left_by_processes_that_died_are_removed_by_the_next_one(tmp_path):
    import os
    import subprocess
    import sys
    code = ("import os, pickle, pathlib, sys; sys.path[:0] = sys.argv[1:]; "
            "import test_shared_listing as t; s = t.listing(pathlib.Path('/tmp')); "
            "pickle.dumps(s); print(s._shared_folder, flush=True); os._exit(75)")
    tests = os.path.dirname(__file__)
    left = subprocess.run([sys.executable, "-c", code, tests, os.path.dirname(tests)],
                          capture_output=True, text=True).stdout.strip()
    assert left and os.path.isdir(left)           # os._exit: no finalizer ran
    samples = listing(tmp_path)
    pickle.dumps(samples)
    assert not os.path.exists(left)
    assert os.path.isdir(samples._shared_folder)   # a live process's copy stays
