"""Accelerator facts used for MFU (`osp.training.callbacks.throughput`) and planning (`osp plan`).

Peaks are NVIDIA's dense bf16 tensor-core figures (no 2:4 sparsity), memory the usable device memory.
A device missing here gets no MFU rather than a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str  # a substring of torch.cuda.get_device_name()
    peak_bf16_flops: float
    memory_bytes: int


GPUS = {
    "h100": GPU("H100", 989e12, 80 * GiB),
    "h200": GPU("H200", 989e12, 141 * 10**9),
    "a100": GPU("A100", 312e12, 80 * GiB),
    "a100-40gb": GPU("A100", 312e12, 40 * GiB),
    "l40s": GPU("L40S", 362e12, 48 * 10**9),
    "a10g": GPU("A10G", 125e12, 24 * 10**9),
    "rtx4090": GPU("RTX 4090", 165e12, 24 * GiB),
}


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device, or None (CPU, or a GPU not in GPUS)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gpu.peak_bf16_flops for gpu in GPUS.values() if gpu.name in name), None)
