"""Ahead-of-time compile gate: every clipped-attention launch configuration (bf16 and fp32; fp16 gets
bf16's tiles and compiles to the same resources, see osp.model.kernels.aot) builds for sm_80 and sm_90,
fits the per-block shared memory of an A100/H100, spills at most SPILL_BOUND bytes (fp32 tiles spill:
strict xfails) and (fp32) issues no TF32 instruction.

No GPU is needed: Triton's bundled ptxas/cuobjdump do the work. conftest.py sets TRITON_INTERPRET=1, under
which `@triton.jit` yields uncompilable interpreter objects, so the compiles run once per session in a
subprocess without it (2 worker processes); their Triton cache lives under the osp cache root.
"""

import json
import os
import subprocess
import sys

import pytest

from osp.data.cache import cache_root
from osp.model.kernels.aot import ARCHS, ATTENTION_DTYPES, ATTENTION_HEAD_DIMS, SHARED_LIMIT
from osp.model.kernels.clipped_attention import KERNELS

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "osp.model.kernels.aot", "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {(r["kernel"], r["dtype"], r["head_dim"], r["arch"]): r for r in json.loads(proc.stdout)}


CASES = [(k, dt, hd, arch)
         for k in KERNELS for dt in ATTENTION_DTYPES for hd in ATTENTION_HEAD_DIMS for arch in ARCHS]


def test_every_case_compiled(compiled):
    assert sorted(compiled) == sorted(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-d{c[2]}-sm{c[3]}")
def test_attention_kernel_fits(compiled, case):
    r = compiled[case]
    limit = SHARED_LIMIT[r["arch"]]
    assert r["shared"] <= limit, f"{case}: {r['shared']} B of shared memory > {limit}"
    if case[1] == "fp32":
        assert not r["tf32"], f"{case}: fp32 kernel issues .tf32 instructions"


# 16-bit dk/dv at head_dim 128 on sm_90 keeps two 64 x 128 fp32 accumulators and spills 96 B (24 registers)
# of its 255; a bound of 128 B lets that through and still catches any tile change that spills for real.
SPILL_BOUND = 128
# fp32 tiles go through FMA dots (input_precision="ieee"), which ptxas lowers with kilobytes of stack
# (1-18 KB per thread): a known defect of launch_config's fp32 tiles, kept visible as strict xfails.
FP32_SPILLS = pytest.mark.xfail(strict=True, reason="fp32 ieee-dot tiles spill to the stack (1-18 KB)")


@pytest.mark.parametrize("case", [pytest.param(c, marks=FP32_SPILLS) if c[1] == "fp32" else c for c in CASES],
                         ids=lambda c: f"{c[0]}-{c[1]}-d{c[2]}-sm{c[3]}")
def test_attention_kernel_does_not_spill(compiled, case):
    r = compiled[case]
    assert r["stack"] <= SPILL_BOUND, f"{case}: {r['stack']} B of stack per thread, {r['registers']} regs"
