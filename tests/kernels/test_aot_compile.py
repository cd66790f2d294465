"""Ahead-of-time compile gate: every launch configuration of every osp Triton kernel builds for sm_80 and
sm_90, fits the per-block shared memory of an A100/H100, spills at most SPILL_BOUND bytes of stack per
thread, issues no TF32 instruction for fp32 inputs, and (W4A4 GEMM) multiplies on int8 tensor cores.

Kernels (see `osp.aot` for the cases): clipped attention fwd/dq/dkdv (bf16, fp32; head dims 64, 128, with
the tiles `launch_config` picks), activation quant+pack (bf16/fp16/fp32 over the recipes' row lengths,
groups, Hadamard, 8-bit and fake-quant variants), the W4A4 GEMM per row and per group (every autotune config)
and the FWHT. No GPU is needed: Triton's bundled ptxas/cuobjdump do the work. conftest.py sets
TRITON_INTERPRET=1, under which `@triton.jit` yields uncompilable interpreter objects, so the compiles run
once per session in a subprocess without it (2 worker processes); their Triton cache lives under the osp
cache root.
"""

import json
import os
import subprocess
import sys

import pytest

from osp.aot import SHARED_LIMIT, all_cases
from osp.data.cache import cache_root

pytest.importorskip("triton")

# 16-bit dk/dv at head_dim 128 on sm_90 keeps two 64 x 128 fp32 accumulators and spills 96 B (24 registers)
# of its 255; a bound of 128 B lets that through and still catches any tile change that spills for real
# (the fp32 64 x 64 attention tiles spilled 1-18 KB, a 128 x 256 W4A4 GEMM tile 300-500 B).
SPILL_BOUND = 128


def _key(record: dict) -> tuple:
    family = record["family"]
    if family == "attention":
        return (family, record["kernel"], record["dtype"], record["head_dim"], record["arch"])
    if family == "quant":
        return (family, record["variant"], record["dtype"], record["arch"])
    if family == "fwht":
        return (family, record["n"], record["dtype"], record["arch"])
    return (family, record["config"], record["group_size"], record["dtype"], record["arch"])


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "osp.aot", "--workers", "2"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {_key(r): r for r in json.loads(proc.stdout)}


CASES = all_cases()


def _id(case: tuple) -> str:
    *rest, arch = case
    return "-".join(str(c) for c in rest if c is not None) + f"-sm{arch}"


def test_every_case_compiled(compiled):
    assert sorted(compiled, key=str) == sorted(CASES, key=str)
    assert {c[0] for c in CASES} == {"attention", "quant", "fwht", "gemm"}


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_kernel_fits_the_gpu(compiled, case):
    r = compiled[case]
    limit = SHARED_LIMIT[r["arch"]]
    assert r["shared"] <= limit, f"{case}: {r['shared']} B of shared memory > {limit}"
    assert r["stack"] <= SPILL_BOUND, f"{case}: {r['stack']} B of stack per thread, {r['registers']} regs"
    if r["family"] != "gemm" and r["dtype"] == "fp32":
        assert not r["tf32"], f"{case}: fp32 kernel issues .tf32 instructions"
    if r["family"] == "gemm":
        assert r["int8_mma"], f"{case}: the W4A4 GEMM does not multiply on int8 tensor cores"


def test_the_gate_sees_spills_and_tf32(tmp_path):
    """The checks can fail: a 128 x 256 W4A4 tile spills, and a default-precision fp32 dot is TF32."""
    code = """
import json, triton, triton.language as tl
from osp.aot import compile_kernel, divisible, gemm_case
from osp.quant.kernels import gemm
gemm._ROW_CONFIGS[:] = [triton.Config({"BM": 128, "BN": 256, "BKP": 64}, num_warps=8, num_stages=3)]
big = gemm_case(0, None, "bf16", 80)

@triton.jit
def dot_kernel(a, b, c, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    x = tl.load(a + r[:, None] * BLOCK + r[None, :])
    y = tl.load(b + r[:, None] * BLOCK + r[None, :])
    tl.store(c + r[:, None] * BLOCK + r[None, :], tl.dot(x, y))

tf32 = compile_kernel(dot_kernel, {"a": "*fp32", "b": "*fp32", "c": "*fp32"}, {"BLOCK": 32}, 80,
                      attrs=divisible(dot_kernel, ("a", "b", "c")))
print(json.dumps({"stack": big["stack"], "tf32": tf32.tf32, "int8_mma": big["int8_mma"]}))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))
    script = tmp_path / "probe.py"  # @triton.jit needs its source in a file
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["stack"] > SPILL_BOUND and seen["tf32"] and seen["int8_mma"]
