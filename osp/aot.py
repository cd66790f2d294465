"""Ahead-of-time compilation of Triton kernels for a CUDA target, without a GPU.

Triton ships ptxas and cuobjdump, so a kernel can be lowered to PTX and a cubin on any machine.
`compile_kernel` does that for one kernel, signature and set of constexprs and reports what decides
whether the launch would succeed on the real device: the shared memory the kernel asks for per block,
the per-thread stack (a kernel that spills registers keeps them there) and the PTX text (to check, for
example, that an fp32 kernel issues no TF32 tensor-core instruction).

`python -m osp.aot` compiles every launch configuration of every osp kernel (clipped attention forward,
dq, dk/dv; activation quant+pack; W4A4 GEMM per row and per group, every autotune config; FWHT) for
sm_80 and sm_90 and prints one JSON record per case; tests/kernels/test_aot_compile.py is the gate.

`triton.jit` returns an interpreter object when TRITON_INTERPRET=1 is set at decoration time, and those
cannot be compiled, so this must run in a process started without it (the test suite runs it in a
subprocess).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Per-block shared-memory limit (cudaDevAttrMaxSharedMemoryPerBlockOptin) of the reference GPU of each
# architecture: A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 166_912, 90: 232_448}


@dataclass
class Compiled:
    """What one ahead-of-time compile reports."""

    name: str
    arch: int
    shared: int  # bytes of shared memory per block
    stack: int  # bytes of per-thread stack (register spills land here)
    registers: int
    tf32: bool  # whether the PTX has a .tf32 instruction
    int8_mma: bool  # whether the PTX multiplies int8 on tensor cores (mma/wgmma .s8)
    ptx: str


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this Triton build ships no {name}; "
                                "install a CUDA-enabled triton")
    return str(path)


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK and SHARED of the (single) function of a cubin, read with `cuobjdump -res-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED):(\d+)", out))
    if "STACK" not in usage or "REG" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line:\n{out}")
    return {k: int(v) for k, v in usage.items()}


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4, num_stages: int = 2,
                   attrs: dict | None = None) -> Compiled:
    """Compile a @triton.jit kernel for sm_<arch>.

    signature maps every runtime argument to its Triton type ("*bf16", "i32", "fp32"); constexprs maps
    the constexpr arguments to values (they are added to the signature as "constexpr"); attrs names the
    arguments the launcher would specialise as 16-divisible, as {(index,): [["tt.divisibility", 16]]}."""
    import triton
    from triton.backends.compiler import GPUTarget

    if not hasattr(fn, "arg_names"):
        raise TypeError(f"{fn!r} is not a compilable @triton.jit function "
                        "(was it decorated under TRITON_INTERPRET=1?)")
    sig = {name: signature[name] if name in signature else "constexpr" for name in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no type or constexpr value for {missing}")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    usage = resource_usage(compiled.asm["cubin"])
    return Compiled(name=fn.__name__, arch=arch, shared=int(compiled.metadata.shared), stack=usage["STACK"],
                    registers=usage["REG"], tf32=bool(re.search(r"\.tf32\b", ptx)),
                    int8_mma=bool(re.search(r"\b(?:w?gmma|mma)\.[\w.]*\.s8\b", ptx)), ptx=ptx)


def divisible(fn, names) -> dict:
    """attrs marking the arguments `names` of fn as 16-divisible (as the launcher sees aligned tensors)."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


# --- clipped attention -------------------------------------------------------------------------------

_ATTN_POINTERS = {
    "fwd": ("Q", "K", "V", "O", "LSE"),
    "dq": ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ"),
    "dkdv": ("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV"),
}
_FP32_POINTERS = {"LSE", "DELTA", "DK", "DV"}  # always fp32, whatever the input dtype
# Dtypes are named as Triton's signature types ("bf16", "fp16", "fp32"): "*" + dtype is a pointer to one.


def _record(out: Compiled, **case) -> dict:
    result = asdict(out)
    del result["ptx"]
    result.update(case, shared_limit=SHARED_LIMIT[out.arch])
    return result


def attention_case(kernel: str, dtype: str, head_dim: int, arch: int) -> dict:
    """Compile one clipped-attention kernel with the launch configuration `launch_config` picks on a GPU.

    The signature is the one `forward`/`backward` launch with; pointers, T and D are marked 16-divisible,
    as they are for torch allocations and the recipes' sequence lengths and head dims."""
    from osp.model.kernels import clipped_attention as ca
    from osp.precision import DTYPES

    fn = {"fwd": ca._fwd_kernel, "dq": ca._bwd_dq_kernel, "dkdv": ca._bwd_dkdv_kernel}[kernel]
    torch_dtype = DTYPES[dtype]
    cfg = ca.launch_config(kernel, torch_dtype, head_dim, interpreted=False)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    pointers = _ATTN_POINTERS[kernel]
    signature = {p: "*fp32" if p in _FP32_POINTERS else "*" + dtype for p in pointers}
    signature.update(T="i32", H="i32", HKV="i32", D="i32", scale="fp32", gamma="fp32", zeta="fp32")
    out = compile_kernel(fn, signature, cfg, arch, num_warps, num_stages,
                         attrs=divisible(fn, (*pointers, "T", "D")))
    return _record(out, family="attention", kernel=kernel, dtype=dtype, head_dim=head_dim, config=cfg,
                   num_warps=num_warps, num_stages=num_stages)


# fp16 is left out of the attention gate: launch_config gives it the same tiles as bf16 and both compile to
# the same shared memory, registers and stack on sm_80 and sm_90 (all 12 pairs checked).
ATTENTION_DTYPES = ("bf16", "fp32")
ATTENTION_HEAD_DIMS = (64, 128)
ARCHS = (80, 90)


def attention_cases() -> list[tuple]:
    from osp.model.kernels.clipped_attention import KERNELS

    return [("attention", k, dt, hd, arch) for k in KERNELS for dt in ATTENTION_DTYPES
            for hd in ATTENTION_HEAD_DIMS for arch in ARCHS]


# --- W4A4 path: activation quant+pack, GEMM, FWHT ------------------------------------------------------

QUANT_DTYPES = ("bf16", "fp16", "fp32")  # activation dtypes the quant and FWHT kernels read
GEMM_OUT_DTYPES = ("bf16", "fp32")
TOKENS = 4096  # rows per launch in the gate: a training/eval micro-batch (the row kernels' widest tiles)
# Quant+pack variants (name: row length K, group size, bits, hadamard, fake) over the recipes' linear inputs:
# d_model 768 (--scale gpu) and 2048 (1.4B), the 1.4B FFN 5504 (padded to 8192), o_proj's head groups.
QUANT_VARIANTS = {
    "k768": (768, None, 4, False, False),
    "k2048": (2048, None, 4, False, False),
    "k2048-had": (2048, None, 4, True, False),
    "k2048-g128": (2048, 128, 4, False, False),
    "k5504": (5504, None, 4, False, False),
    "k2048-a8": (2048, None, 8, False, False),
    "k2048-had-fake": (2048, None, 4, True, True),
}
FWHT_LENGTHS = (32, 256, 2048, 8192)  # 32 and 256: the power-of-two factors of 5504 and 768
GEMM_GROUP_SIZES = (64, 128)  # head dims


def quant_case(variant: str, dtype: str, arch: int) -> dict:
    """Compile `_quant_rows_kernel` as `osp.quant.kernels.quant_rows_triton` launches it for TOKENS rows."""
    import triton

    from osp.quant.kernels import quant as qk
    from osp.quant.kernels.common import rows_launch

    k, group, bits, hadamard, fake = QUANT_VARIANTS[variant]
    bk = triton.next_power_of_2(k)
    g, num_g = (bk, 1) if group is None else (group, k // group)
    bm, num_warps = rows_launch(TOKENS, bk)
    x = "*" + dtype
    pointers = ("x_ptr", "codes_ptr", "scale_ptr", "zero_ptr", "fake_ptr")
    signature = dict(zip(pointers, (x, x, x, x, x) if fake else (x, "*i8", "*fp32", "*fp32", "*fp32")))
    signature.update(M="i32", K="i32", stride_x="i32", stride_c="i32", clip="fp32", had_scale="fp32")
    constexprs = dict(BM=bm, BK=bk, G=g, LOG_K=bk.bit_length() - 1, BITS=bits, SYM=False, ZERO_INCLUSIVE=True,
                      HADAMARD=hadamard, FAKE=fake)
    # Integer arguments equal to 1 are specialised by the launcher (constexpr 1); the others are runtime.
    ints = dict(NUM_G=num_g, stride_s=k if fake else num_g, stride_f=k if fake else 1)
    for name, value in ints.items():
        if value == 1:
            constexprs[name] = 1
        else:
            signature[name] = "i32"
    fn = qk._quant_rows_kernel
    out = compile_kernel(fn, signature, constexprs, arch, num_warps, 1,
                         attrs=divisible(fn, (*pointers, "stride_x")))
    return _record(out, family="quant", kernel="quant_rows", dtype=dtype, variant=variant, rows=bm,
                   num_warps=num_warps)


def fwht_case(n: int, dtype: str, arch: int) -> dict:
    """Compile `_fwht_kernel` as `osp.quant.kernels.fwht_triton` launches it for TOKENS rows of length n."""
    import importlib

    from osp.quant.kernels.common import rows_launch

    fk = importlib.import_module("osp.quant.kernels.fwht")

    bm, num_warps = rows_launch(TOKENS, n)
    x = "*" + dtype
    fn = fk._fwht_kernel
    out = compile_kernel(fn, dict(x_ptr=x, y_ptr=x, M="i32", stride_x="i32", stride_y="i32", scale="fp32"),
                         dict(BM=bm, N=n, LOG_N=n.bit_length() - 1), arch, num_warps, 1,
                         attrs=divisible(fn, ("x_ptr", "y_ptr", "stride_x", "stride_y")))
    return _record(out, family="fwht", kernel="fwht", dtype=dtype, n=n, rows=bm, num_warps=num_warps)


def gemm_case(config: int, group_size: int | None, out_dtype: str, arch: int) -> dict:
    """Compile `_w4a4_gemm_kernel` with autotune config number `config` of the row or the grouped list.

    K = 2048 (packed 1024); pointers, N, KP and the row strides are 16-divisible as for torch allocations."""
    from osp.quant.kernels import gemm

    configs = gemm._ROW_CONFIGS if group_size is None else gemm._GROUP_CONFIGS
    cfg = configs[config]
    grouped = group_size is not None
    pointers = ("a_ptr", "w_ptr", "sa_ptr", "za_ptr", "sw_ptr", "ws_ptr", "bias_ptr", "out_ptr")
    types = ("*i8", "*i8", "*fp32", "*fp32", "*fp32", "*i32", "*fp32", "*" + out_dtype)
    signature = dict(zip(pointers, types))
    signature.update(M="i32", N="i32", KP="i32", stride_am="i32", stride_wn="i32", stride_om="i32")
    constexprs = dict(cfg.kwargs, HAS_BIAS=False, GROUPED=grouped)
    if grouped:
        signature.update(NUM_G="i32", stride_sm="i32", stride_wsn="i32")
        constexprs["BKP"] = group_size // 2
    else:
        constexprs.update(NUM_G=1, stride_sm=1, stride_wsn=1)  # per-row scales: [M, 1], [N, 1]
    fn = gemm._w4a4_gemm_kernel
    out = compile_kernel(fn, signature, constexprs, arch, cfg.num_warps, cfg.num_stages,
                         attrs=divisible(fn, (*pointers, "N", "KP", "stride_am", "stride_wn", "stride_om")))
    return _record(out, family="gemm", kernel="w4a4_gemm_groups" if grouped else "w4a4_gemm_rows",
                   dtype=out_dtype, config=config, group_size=group_size, tiles=dict(cfg.kwargs),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def quant_cases() -> list[tuple]:
    from osp.quant.kernels import gemm

    cases: list[tuple] = [("quant", variant, dt, arch) for variant in QUANT_VARIANTS for dt in QUANT_DTYPES
                          for arch in ARCHS]
    cases += [("fwht", n, dt, arch) for n in FWHT_LENGTHS for dt in QUANT_DTYPES for arch in ARCHS]
    cases += [("gemm", i, None, dt, arch) for i in range(len(gemm._ROW_CONFIGS)) for dt in GEMM_OUT_DTYPES
              for arch in ARCHS]
    cases += [("gemm", i, g, "bf16", arch) for i in range(len(gemm._GROUP_CONFIGS)) for g in GEMM_GROUP_SIZES
              for arch in ARCHS]
    return cases


_CASE_FUNCTIONS = {"attention": attention_case, "quant": quant_case, "fwht": fwht_case, "gemm": gemm_case}


def compile_case(case: tuple) -> dict:
    """One case of `all_cases()`: (family, *arguments of that family's *_case function)."""
    return _CASE_FUNCTIONS[case[0]](*case[1:])


def all_cases() -> list[tuple]:
    return attention_cases() + quant_cases()


def compile_all(workers: int = 2) -> list[dict]:
    """Every case, over `workers` processes."""
    cases = all_cases()
    if workers <= 1:
        return [compile_case(c) for c in cases]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_case, cases))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Compile osp's Triton kernels for sm_80/sm_90; print JSON.")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to compile kernels ahead of time", file=sys.stderr)
        return 2
    json.dump(compile_all(args.workers), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
