"""Muon/ROOT on 2 gloo ranks (DDP and FSDP2) give the parameters of the single-process run.

The ranks run in a torchrun subprocess (never Lightning's `ddp` strategy inside pytest). Tolerance:
rtol 1e-4, atol 2e-5 after 3 steps with fp32 Newton–Schulz — the only difference between the runs is
the order of the floating-point sums in the gradient all-reduce.
"""

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("dist_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("osp_optim_dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("mode, name", [("ddp", "muon"), ("ddp", "root"), ("fsdp", "muon"), ("fsdp", "root")])
def test_two_ranks_match_one_process(two_rank_run, mode, name):
    worker = _worker_module()
    model = worker.make_model()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt, unused = worker.make_optimizer(model, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker.train(model, opt)
    got = torch.load(two_rank_run / f"{mode}_{name}.pt")
    for key, p in model.named_parameters():
        assert not torch.equal(p, start[key]), key  # the step moved it, so the comparison means something
        torch.testing.assert_close(got[key], p.detach(), rtol=1e-4, atol=2e-5, msg=f"{mode}/{name}: {key}")
    # A parameter without a gradient is left alone on every rank, as on one process.
    assert torch.equal(got["unused"], unused.detach())

    # The Newton-Schulz work was split: each rank orthogonalized about half of the matrices.
    counts = [torch.load(two_rank_run / f"{mode}_{name}_rank{r}.pt")["matrices"] for r in range(2)]
    n_matrices = sum(len(g["params"]) for g in opt.param_groups if g["algorithm"] == name)  # unused included
    assert counts[0] == counts[1] and n_matrices * worker.STEPS <= sum(counts) < 2 * n_matrices * worker.STEPS
