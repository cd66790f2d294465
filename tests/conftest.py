"""Test environment: no network, no GPU, Triton kernels in interpreter mode.

These variables must be set before any kernel module is imported (Triton reads
TRITON_INTERPRET when `@triton.jit` decorates a function), so they live at the very top.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from osp.precision import ASSUME_NATIVE_BF16  # noqa: E402
from tests.support.synthetic_text import write_corpus  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        # `pytest -m auto_precision` selects the tests whose numbers depend on what `auto` resolves to.
        if "auto_precision" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.auto_precision)
        # Tiers: multi-process tests belong to the integration tier (`pytest -m "not slow"` is the unit tier).
        if item.get_closest_marker("distributed") is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["fp32", "bf16"])
def auto_precision(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test twice: with `auto` (trainer.precision, optim.ns_dtype) resolved as on a CPU that emulates
    bf16 (fp32) and as on one that computes it natively (bf16), in the test and in the processes it starts.
    So one machine of either kind runs what the other kind would."""
    monkeypatch.setenv(ASSUME_NATIVE_BF16, "1" if request.param == "bf16" else "0")
    return request.param


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The corpus glob and a cache dir shared by every run of the session (the tokenizer is trained once)."""
    root = tmp_path_factory.mktemp("training_data")
    return {"paths": write_corpus(root / "corpus"), "cache": str(root / "cache")}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process training on one thread: with other work on the machine, two OpenMP threads spin-wait
    for each other and run 10-40x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
