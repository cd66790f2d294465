"""Ahead-of-time compilation of Triton kernels for a CUDA target, without a GPU.

Triton ships ptxas and cuobjdump, so a kernel can be lowered to PTX and a cubin on any machine.
`compile_kernel` does that for one kernel, signature and set of constexprs and reports what decides
whether the launch would succeed on the real device: the shared memory the kernel asks for per block,
the per-thread stack (a kernel that spills registers keeps them there) and the PTX text (to check, for
example, that an fp32 kernel issues no TF32 tensor-core instruction).

`triton.jit` returns an interpreter object when TRITON_INTERPRET=1 is set at decoration time, and those
cannot be compiled, so this must run in a process started without it (the test suite runs it in a
subprocess: `python -m osp.model.kernels.aot` compiles the clipped-attention launch configurations and
prints JSON).
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
                    registers=usage["REG"], tf32=bool(re.search(r"\.tf32\b", ptx)), ptx=ptx)


def divisible(fn, names) -> dict:
    """attrs marking the arguments `names` of fn as 16-divisible (as the launcher sees aligned tensors)."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


# --- clipped attention -------------------------------------------------------------------------------

_TRITON_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_ATTN_POINTERS = {
    "fwd": ("Q", "K", "V", "O", "LSE"),
    "dq": ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ"),
    "dkdv": ("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV"),
}
_FP32_POINTERS = {"LSE", "DELTA", "DK", "DV"}  # always fp32, whatever the input dtype


def attention_case(kernel: str, dtype: str, head_dim: int, arch: int) -> dict:
    """Compile one clipped-attention kernel with the launch configuration `launch_config` picks on a GPU.

    The signature is the one `forward`/`backward` launch with; pointers, T and D are marked 16-divisible,
    as they are for torch allocations and the recipes' sequence lengths and head dims."""
    import torch

    from osp.model.kernels import clipped_attention as ca

    fn = {"fwd": ca._fwd_kernel, "dq": ca._bwd_dq_kernel, "dkdv": ca._bwd_dkdv_kernel}[kernel]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = ca.launch_config(kernel, torch_dtype, head_dim, interpreted=False)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    pointers = _ATTN_POINTERS[kernel]
    signature = {p: "*fp32" if p in _FP32_POINTERS else "*" + _TRITON_DTYPE[dtype] for p in pointers}
    signature.update(T="i32", H="i32", HKV="i32", D="i32", scale="fp32", gamma="fp32", zeta="fp32")
    out = compile_kernel(fn, signature, cfg, arch, num_warps, num_stages,
                         attrs=divisible(fn, (*pointers, "T", "D")))
    result = asdict(out)
    del result["ptx"]
    result.update(kernel=kernel, dtype=dtype, head_dim=head_dim, config=cfg, num_warps=num_warps,
                  num_stages=num_stages, shared_limit=SHARED_LIMIT[arch])
    return result


def _attention_case(args):
    return attention_case(*args)


# fp16 is left out of the gate: launch_config gives it the same tiles as bf16 and both compile to the same
# shared memory, registers and stack on sm_80 and sm_90 (all 12 pairs checked), while each case costs ~10 s.
ATTENTION_DTYPES = ("bf16", "fp32")
ATTENTION_HEAD_DIMS = (64, 128)
ARCHS = (80, 90)


def attention_cases(workers: int = 2) -> list[dict]:
    """Every clipped-attention kernel x dtype x head dim x {sm_80, sm_90}, over `workers` processes."""
    from osp.model.kernels.clipped_attention import KERNELS

    cases = [(k, dt, hd, arch) for k in KERNELS for dt in ATTENTION_DTYPES for hd in ATTENTION_HEAD_DIMS
             for arch in ARCHS]
    if workers <= 1:
        return [attention_case(*c) for c in cases]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_attention_case, cases))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Compile osp's Triton kernels for sm_80/sm_90; print JSON.")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to compile kernels ahead of time", file=sys.stderr)
        return 2
    json.dump(attention_cases(args.workers), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
