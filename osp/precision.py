"""Numeric precision of a run: `auto` resolved per machine, and the autocast each precision means.

`trainer.precision=auto` (the CPU default) is bf16 autocast where the hardware computes in bf16 natively
(CPUs with AVX-512-BF16 or AMX, GPUs from Ampere on) and fp32 elsewhere: on an AVX2-only CPU a bf16 matmul
is emulated and ~50x slower than fp32, so the default run would take hours instead of minutes.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from osp.errors import ConfigError

# Config and CLI names of torch dtypes (short and long), the one map every `*_dtype` key resolves through.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

AUTO = "auto"
# What Lightning's Trainer accepts (lightning.fabric.connector._PRECISION_INPUT_STR), plus osp's "auto".
KNOWN = ("auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16", "bf16-true", "16-true",
         "64-true", "64", "transformer-engine", "transformer-engine-float16")


# What `auto` assumes of the CPU instead of asking it: "1" as if bf16 were native, "0" as if it were emulated.
# The tests set it to run every precision-dependent test both ways on any machine; unset, the CPU is asked.
ASSUME_NATIVE_BF16 = "OSP_ASSUME_NATIVE_BF16"


def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run natively (not emulated) on this machine's `device_type` ("cpu" | "cuda");
    for the CPU, $OSP_ASSUME_NATIVE_BF16 (0 or 1) overrides what the CPU says."""
    assumed = os.environ.get(ASSUME_NATIVE_BF16, "")
    if device_type == "cpu" and assumed:
        if assumed not in ("0", "1"):
            raise ConfigError(f"{ASSUME_NATIVE_BF16}={assumed!r} must be 0 or 1 (or unset: ask the CPU)")
        return assumed == "1"
    return _detected_native_bf16(device_type)


@functools.cache  # asked at every Newton-Schulz call (optim ns_dtype=auto); the answer never changes
def _detected_native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def auto_dtype_name(device_type: str) -> str:
    """What a `*_dtype: auto` setting (optim.ns_dtype) means on `device_type`: "bf16" where bf16 matmuls are
    native, "fp32" where they would be emulated."""
    return "bf16" if native_bf16(device_type) else "fp32"


def accelerator_device_type(accelerator: str) -> str:
    """"cuda" or "cpu" for a Lightning accelerator name ("auto" picks CUDA when it is present)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resolve_precision(precision: str | int, accelerator: str = "cpu") -> str:
    """`precision` as Lightning takes it: `auto` becomes bf16-mixed where bf16 is native, else 32-true.

    Raises ValueError naming the accepted values for anything Lightning would not accept.
    """
    value = str(precision)
    if value not in KNOWN:
        raise ConfigError(f"trainer.precision={value!r} is not a precision; use one of {', '.join(KNOWN)}")
    if value != AUTO:
        return value
    return "bf16-mixed" if native_bf16(accelerator_device_type(accelerator)) else "32-true"


def autocast_for(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The autocast Lightning applies for `precision` (so numbers outside the Trainer equal the in-training
    ones); a no-op for true-precision settings."""
    device_type = torch.device(device).type
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16"):
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()
