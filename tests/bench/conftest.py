"""The benches run here at minuscule sizes, where extra torch threads only add waiting: on a shared
machine a multi-threaded op on a tiny tensor can stall for a scheduler tick, so tests use one thread."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
