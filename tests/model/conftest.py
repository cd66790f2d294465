"""Model tests run on tiny tensors, where intra-op threads cost more than they give (thread wake-ups, and
on shared CI cores contention that makes each op ~10x slower), so they run single-threaded."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
