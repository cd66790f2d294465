"""`osp bench quant` on a CUDA device: the eval-cost table and the Triton W4A4 GEMM table.

Run with `-s` to see the tables. The bench prints no speed-ratio line of its own: the eval table has an
`x fp` column (quantized eval time / fp eval time), and for the GEMM table this test prints, per shape, the
ratio of the bf16 torch matmul time to the W4A4 GEMM-only and quant+GEMM times (>1: W4A4 is faster).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.support.cli import REPO
from tests.support.gpu import gpu_env

pytestmark = pytest.mark.gpu

# bench_gemm's title: "W4A4 GEMM on <device name> (M tokens x N out x K in; ...)"
GEMM_TITLE = "W4A4 GEMM on "
EVAL_TITLE = "W4A4 eval cost on cuda"
PATHS = ["bf16 matmul", "fake-quant (torch)", "fake-quant (triton quant)", "W4A4 triton (quant+gemm)",
         "W4A4 triton gemm only"]
SHAPES = ["4096x2048x2048", "4096x5504x2048", "4096x2048x5504", "16384x4096x4096"]  # the bench's defaults


def gemm_rows(table: str) -> dict[tuple[str, str], float]:
    """(shape, path) -> ms, from the GEMM table's rows."""
    rows = {}
    for line in table.splitlines()[3:]:
        m = re.match(r"^(\d+x\d+x\d+)\s+(.+?)\s+([0-9.]+)\s+([0-9.]+)\s+(\S+)\s*$", line)
        if m:
            rows[(m.group(1), m.group(2))] = float(m.group(3))
    return rows


def speed_ratios(rows: dict[tuple[str, str], float]) -> list[str]:
    lines = []
    for shape in dict.fromkeys(s for s, _ in rows):
        bf16 = rows[(shape, "bf16 matmul")]
        lines.append(f"speed ratio {shape}: bf16 matmul / W4A4 gemm only = "
                     f"{bf16 / rows[(shape, 'W4A4 triton gemm only')]:.2f}x, bf16 matmul / W4A4 quant+gemm = "
                     f"{bf16 / rows[(shape, 'W4A4 triton (quant+gemm)')]:.2f}x")
    return lines


def test_bench_quant_prints_the_w4a4_gemm_table():
    proc = subprocess.run([sys.executable, "-m", "osp", "bench", "quant", "--repeats", "2"], cwd=REPO,
                          env=gpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    out = proc.stdout
    assert EVAL_TITLE in out and " x fp " in out, out  # the eval table, with its time ratio to fp
    assert GEMM_TITLE in out, out
    table = out[out.index(GEMM_TITLE):]
    rows = gemm_rows(table)
    assert set(rows) == {(s, p) for s in SHAPES for p in PATHS}, table
    assert all(ms > 0 for ms in rows.values()), table
    ratios = speed_ratios(rows)
    print("\n" + table.rstrip() + "\n\n" + "\n".join(ratios))
    assert len(ratios) == len(SHAPES)
