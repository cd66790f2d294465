"""`osp bench quant`: cost of the W4A4 evaluation, and the Triton W4A4 GEMM where CUDA is available.

Part 1 (any device): perplexity of a random-init model in full precision vs. under each preset's fake-quant
view — view entry (weight quantization incl. the MSE clip sweep) and evaluation timed separately.
Part 2 (any device): what the down_proj rotation (`+had`) adds at inference, per down_proj layer: its
input's per-token quantization with and without the Hadamard, against the layer's matmul, on the torch path
(an FWHT, then the quantizer). This is the cost the outlier-safe FFN remedies avoid
(docs/outlier_safe_ffn.md).
Part 3 (CUDA only): for each GEMM shape, side by side in one run: bf16 torch matmul, the torch fake-quant
linear (torch twin: quantize-dequantize the activation, bf16 matmul with the dequantized weight), the same
with the Triton quant kernel, and the real W4A4 path (Triton quant+pack kernel, then the int8 two-plane
GEMM), with the Hadamard fused into the quant kernel (K a power of two) and without; also the GEMM alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from osp.model import ModelConfig, Transformer
from osp.quant import QuantConfig, nll_stats, ops, quantized
from osp.quant import quantizers as Q
from osp.tables import format_rows


def _timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall seconds of fn over `repeats` runs after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_eval(args: argparse.Namespace, device: torch.device) -> str:
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        max_seq_len=args.seq_len,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    blocks = torch.randint(0, args.vocab, (args.blocks, args.seq_len + 1))
    tokens = blocks[:, 1:].numel()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def eval_fp() -> tuple[float, int]:
        return nll_stats(model, blocks, args.batch_size)

    t_fp = _timed(eval_fp, args.repeats, sync)
    nll, count = eval_fp()
    rows = [
        ["fp", "-", f"{t_fp:.3f}", f"{tokens / t_fp:,.0f}", "1.00", f"{torch.tensor(nll / count).exp():.2f}"]
    ]
    for preset in args.presets:
        qcfg = QuantConfig.from_preset(preset)
        start = time.perf_counter()
        with quantized(model, qcfg, backend=args.backend):
            sync()
            t_enter = time.perf_counter() - start
            t_q = _timed(eval_fp, args.repeats, sync)
            nll_q, _ = eval_fp()
        rows.append(
            [
                qcfg.name,
                f"{t_enter:.3f}",
                f"{t_q:.3f}",
                f"{tokens / t_q:,.0f}",
                f"{t_q / t_fp:.2f}",
                f"{torch.tensor(nll_q / count).exp():.2f}",
            ]
        )
    title = (
        f"W4A4 eval cost on {device.type} ({torch.get_num_threads()} thread(s)): random-init model "
        f"d={cfg.d_model} L={cfg.n_layers} heads={cfg.n_heads} ffn={cfg.ffn_hidden} vocab={cfg.vocab_size}, "
        f"{args.blocks} blocks x {args.seq_len} tokens, batch {args.batch_size}, median of {args.repeats}"
    )
    header = ["view", "enter s", "eval s", "tokens/s", "x fp", "ppl"]
    return title + "\n" + format_rows([header, *rows])


def bench_rotation(args: argparse.Namespace, device: torch.device) -> str:
    """Per down_proj layer (tokens x FFN width in, d_model out): quantizing its input with and without the
    online Hadamard, against the layer's own matmul; median times, interleaved repeats."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ffn = args.ffn_hidden
    tokens = args.batch_size * args.seq_len
    x = torch.randn(tokens, ffn, device=device, dtype=torch.bfloat16)
    w = (torch.randn(args.d_model, ffn, device=device) * 0.02).bfloat16()
    backend = args.backend or ("triton" if device.type == "cuda" and ops.triton_available() else "torch")
    cases = {
        "matmul (the layer)": lambda: x @ w.T,
        "quantize input": lambda: ops.quant_rows(x, 4, out="fake", backend=backend),
        "Hadamard + quantize input": lambda: ops.quant_rows(x, 4, hadamard=True, out="fake", backend=backend),
    }
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn, 1, sync))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    extra = ms["Hadamard + quantize input"] - ms["quantize input"]
    rows = [[name, f"{value:.3f}", f"{value / ms['matmul (the layer)']:.2f}"] for name, value in ms.items()]
    threads = torch.get_num_threads()
    share = 100 * extra / ms["matmul (the layer)"]
    title = (f"down_proj input rotation on {device.type} ({backend} path, {threads} thread(s)): "
             f"{tokens} tokens x {ffn} in -> {args.d_model} out, bf16, median of {args.repeats}\n"
             f"the Hadamard adds {extra:.3f} ms per layer = {share:.0f}% of the layer's matmul")
    return title + "\n" + format_rows([["step", "ms", "x matmul"], *rows])


def _gemm_cases(m: int, n: int, k: int, dev: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """The compared paths for one (M tokens, N out, K in) linear, as zero-argument callables."""
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.float32) * 0.02
    qw = Q.quantize_weight(w, 4, mse=False)
    w_bf16, w_deq = w.bfloat16(), qw.dequantize(torch.bfloat16)
    w_packed, wsum = qw.packed(), qw.group_sums()
    codes, s_a, z_a = ops.quant_rows(x, 4, backend="triton")

    def fake(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: ops.quant_rows(x, 4, out="fake", backend=backend) @ w_deq.T

    def w4a4() -> torch.Tensor:
        a, s, z = ops.quant_rows(x, 4, backend="triton")
        return ops.w4a4_gemm(a, s, z, w_packed, qw.scale, wsum, out_dtype=torch.bfloat16, backend="triton")

    def gemm_only() -> torch.Tensor:
        return ops.w4a4_gemm(
            codes, s_a, z_a, w_packed, qw.scale, wsum, out_dtype=torch.bfloat16, backend="triton"
        )

    def w4a4_rotated() -> torch.Tensor:  # the Hadamard fused into the quant kernel (a power-of-two K)
        a, s, z = ops.quant_rows(x, 4, hadamard=True, backend="triton")
        return ops.w4a4_gemm(a, s, z, w_packed, qw.scale, wsum, out_dtype=torch.bfloat16, backend="triton")

    rotated = {"W4A4 triton (quant+had fused+gemm)": w4a4_rotated} if k & (k - 1) == 0 else {}
    return {
        "bf16 matmul": lambda: x @ w_bf16.T,
        "fake-quant (torch)": fake("torch"),
        "fake-quant (triton quant)": fake("triton"),
        "W4A4 triton (quant+gemm)": w4a4,
        "W4A4 triton gemm only": gemm_only,
        **rotated,
    }


def bench_gemm(args: argparse.Namespace) -> str:
    import triton.testing

    dev = torch.device("cuda")
    rows = []
    for shape in args.gemm_shapes:
        m, n, k = (int(v) for v in shape.split("x"))
        cases = _gemm_cases(m, n, k, dev)
        ref = cases["fake-quant (torch)"]().float()
        err = ((cases["W4A4 triton (quant+gemm)"]().float() - ref).abs().max() / ref.abs().max()).item()
        for name, fn in cases.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100)
            rows.append([f"{m}x{n}x{k}", name, f"{ms:.4f}", f"{2 * m * n * k / ms / 1e9:.1f}", f"{err:.1e}"])
    title = f"W4A4 GEMM on {torch.cuda.get_device_name()} (M tokens x N out x K in; triton.testing.do_bench)"
    return title + "\n" + format_rows([["shape", "path", "ms", "TFLOP/s", "W4A4 vs fake rel err"], *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="osp bench quant", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--presets", nargs="+", default=["w4a4kv4", "w4a4kv4+had", "w4a16", "w16a4kv4"])
    parser.add_argument("--backend", choices=["torch", "triton"], default=None, help="force a kernel path")
    parser.add_argument(
        "--gemm-shapes",
        nargs="+",
        default=["4096x2048x2048", "4096x5504x2048", "4096x2048x5504", "4096x2048x8192", "16384x4096x4096"],
        help="MxNxK GEMMs for the CUDA part",
    )
    parser.add_argument("--skip-gemm", action="store_true", help="skip the CUDA GEMM comparison")
    parser.add_argument("--ffn-hidden", type=int, default=768,
                        help="down_proj input width of the rotation part (default: the tiny recipe's 768)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(bench_eval(args, device))
    print()
    print(bench_rotation(args, device))
    if device.type == "cuda" and not args.skip_gemm and ops.triton_available():
        print()
        print(bench_gemm(args))
    elif not torch.cuda.is_available():
        print("\n(no CUDA device: the Triton W4A4 GEMM comparison runs only on a GPU)")
