"""`osp bench optim`: training-step time of Muon and ROOT relative to AdamW on the same Transformer.

The three optimizers train three copies of one model side by side: every repetition runs one step of
each, in a fresh random order, and the table reports medians. A step is forward + backward over all
micro-batches (tokens per step = batch × seq_len × accumulation) plus optimizer.step(), each timed.
The step ratio is (fwd+bwd + opt.step of X) / (fwd+bwd + opt.step of AdamW). Larger steps amortize
the optimizer, so the overhead shrinks.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from osp.model import ModelConfig, Transformer
from osp.optim import OptimConfig
from osp.optim.newton_schulz import resolve_dtype
from osp.precision import autocast_for

OPTIMIZERS = ("adamw", "muon", "root")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp bench optim", description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument(
        "--accumulation",
        type=int,
        nargs="+",
        default=[1, 8],
        help="micro-batches per optimizer step, one table row each (default 1 and 8: 4k and 32k tokens)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per optimizer before timing")
    p.add_argument("--precision", choices=("bf16-mixed", "32"), default="bf16-mixed")
    p.add_argument("--ns-dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="Newton-Schulz dtype (auto: bf16 where native, else fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p


def machine(device: torch.device) -> str:
    """One line naming the hardware and software the numbers come from."""
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hw = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{hw} | torch {torch.__version__} | python {platform.python_version()} | {platform.system()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(model, opt, batches, autocast, device) -> tuple[float, float]:
    """(seconds for the whole step, seconds for optimizer.step alone)."""
    _sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for tokens in batches:
        with autocast:
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        (loss / len(batches)).backward()
    _sync(device)
    t1 = time.perf_counter()
    opt.step()
    _sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def main(argv: list[str]) -> None:
    """Print median step times and the Muon/AdamW and ROOT/AdamW step-time ratios, one row per tokens/step."""
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        max_seq_len=args.seq_len,
    )
    base = Transformer(cfg).to(device)
    models = {name: copy.deepcopy(base) for name in OPTIMIZERS}
    opts = {
        name: OptimConfig(name=name, ns_dtype=args.ns_dtype).build(models[name]) for name in OPTIMIZERS
    }
    autocast = autocast_for(args.precision, device)
    order_rng = random.Random(args.seed)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"machine: {machine(device)}")
    # auto as this device runs it
    ns_dtype = str(resolve_dtype(args.ns_dtype, device.type)).removeprefix("torch.")
    print(
        f"model: d {cfg.d_model}, {cfg.n_layers} layers, vocab {cfg.vocab_size}, "
        f"{n_params / 1e6:.2f}M params; seq {args.seq_len}, micro-batch {args.batch_size}, "
        f"precision {args.precision}, NS {ns_dtype}; "
        f"median of {args.reps}, interleaved"
    )
    header = (
        f"{'tokens/step':>11} | {'fwd+bwd s':>9} | {'opt.step ms: adamw':>18} {'muon':>7} {'root':>7} | "
        f"{'step muon/adamw':>15} {'root/adamw':>10}"
    )
    print(header)
    print("-" * len(header))
    with warnings.catch_warnings():
        # ROOT's "no coefficients for this shape" warning is expected at these sizes.
        warnings.simplefilter("ignore")
        for accumulation in args.accumulation:
            gen = torch.Generator().manual_seed(args.seed)
            batches = [
                torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1),
                              generator=gen).to(device)
                for _ in range(accumulation)
            ]
            fwd_bwd: list[float] = []
            opt_s: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
            for rep in range(args.warmup + args.reps):
                order = list(OPTIMIZERS)
                order_rng.shuffle(order)
                for name in order:
                    total, opt_only = _timed_step(models[name], opts[name], batches, autocast, device)
                    if rep >= args.warmup:
                        fwd_bwd.append(total - opt_only)
                        opt_s[name].append(opt_only)
            # Forward + backward is the same work for the three copies, so its samples are pooled: the
            # ratios then depend on the optimizer steps, not on which copy a CPU hiccup happened to hit.
            fb = statistics.median(fwd_bwd)
            opt = {name: statistics.median(opt_s[name]) for name in OPTIMIZERS}
            step = {name: fb + opt[name] for name in OPTIMIZERS}
            tokens = accumulation * args.batch_size * args.seq_len
            print(
                f"{tokens:>11,} | {fb:>9.3f} | {1e3 * opt['adamw']:>18.1f} {1e3 * opt['muon']:>7.1f} "
                f"{1e3 * opt['root']:>7.1f} | {step['muon'] / step['adamw']:>15.3f} "
                f"{step['root'] / step['adamw']:>10.3f}",
                flush=True,
            )
