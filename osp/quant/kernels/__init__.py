"""Triton kernels of the W4A4 path; each has a torch twin in `osp.quant.quantizers` / `osp.quant.hadamard`.

Import only through `osp.quant.ops`, which decides when Triton is usable (CUDA, or `TRITON_INTERPRET=1`
set before this package is imported).
"""

from .common import INTERPRET
from .fwht import fwht_triton
from .gemm import w4a4_gemm_triton
from .quant import quant_rows_triton

__all__ = ["INTERPRET", "fwht_triton", "quant_rows_triton", "w4a4_gemm_triton"]
