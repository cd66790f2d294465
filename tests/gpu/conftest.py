"""GPU test suite: real Triton kernels and real training on one CUDA device.

Run on a CUDA machine with the documented command (docs/gpu.md):

    TRITON_INTERPRET=0 .venv/bin/python -m pytest -q -m gpu tests/gpu

Without a CUDA device every test here is skipped with the one reason "needs a CUDA device". With one, the
Triton interpreter must be off: tests/conftest.py defaults TRITON_INTERPRET to 1 for the CPU suite, and under
the interpreter these tests would run the CPU emulation instead of the compiled kernels, so the session
stops at once with a message saying so (if the selection holds only GPU tests), or each GPU test fails with
that message (a mixed selection, so that the CPU tests still run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SKIP_REASON = "needs a CUDA device"
INTERPRETER_MESSAGE = (
    "tests/gpu: TRITON_INTERPRET={value!r} with a CUDA device present - these tests would run Triton's CPU "
    "interpreter, not the compiled kernels. tests/conftest.py defaults it to 1 for the CPU suite; run\n"
    "    TRITON_INTERPRET=0 .venv/bin/python -m pytest -q -m gpu tests/gpu"
)


def interpreter_on() -> bool:
    """As osp.quant.kernels.common reads it: anything but unset, "" or "0" turns the interpreter on."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _ours(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only the tests that will run are seen
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if _ours(item)]
    if not ours:
        return
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=SKIP_REASON)
        for item in ours:
            item.add_marker(skip)
        return
    if interpreter_on() and len(ours) == len(items) and not config.option.collectonly:
        pytest.exit(INTERPRETER_MESSAGE.format(value=os.environ.get("TRITON_INTERPRET")), returncode=4)


@pytest.fixture(autouse=True)
def _compiled_kernels() -> None:
    """The failing check of a mixed selection (CPU and GPU tests together) with the interpreter on."""
    if interpreter_on():
        pytest.fail(INTERPRETER_MESSAGE.format(value=os.environ.get("TRITON_INTERPRET")), pytrace=False)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")
