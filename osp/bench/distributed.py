"""`osp bench distributed`: data-parallel throughput and FSDP2 memory on CPU, through the real training stack.

Runs of one recipe's model (default: tiny) with the same global batch, each a fresh process tree:
  single     1 process x 2 threads         (trainer=cpu)
  single-1t  1 process x 1 thread          (trainer=cpu; the baseline per core)
  ddp        2 ranks x 1 thread, torchrun   (trainer=ddp, gloo)
  fsdp2      2 ranks x 1 thread, torchrun   (trainer=fsdp, gloo, bf16 parameter policy)
Each builds the module and Lightning Trainer exactly as `osp train` does (`build_module`, `build_trainer`),
trains on random tokens (no corpus needed), and reports the median step time after warm-up, tokens/s
of the global batch, and per rank the bytes of parameters and optimizer state it holds (local shards
under FSDP2) and its peak RSS. The load average is printed: on a shared machine it moves the times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from osp.atomic import write_text
from osp.runs import check_output_file
from osp.tables import format_rows

LAYOUTS = {  # name -> (trainer config, ranks, threads per rank)
    "single": ("cpu", 1, 2),
    "single-1t": ("cpu", 1, 1),
    "ddp": ("ddp", 2, 1),
    "fsdp2": ("fsdp", 2, 1),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp bench distributed", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="tiny", help="recipe whose model and optimizer are measured")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step (all ranks)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the recipe's data.seq_len")
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p


# Worker: one training run (one rank of it) -------------------------------------------------------------


def _worker(args: argparse.Namespace) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    from osp.conf.resolvers import register_resolvers
    from osp.optim.distributed import local
    from osp.training.parallel import fsdp_options_of
    from osp.training.run import build_module, build_trainer

    trainer_name, ranks, threads = LAYOUTS[args.worker]
    torch.set_num_threads(threads)
    cfg = _compose(args, trainer_name, ranks)
    seq_len, per_rank = int(cfg.data.seq_len), args.global_batch // ranks
    vocab = int(cfg.data.vocab_size)

    class RandomTokens(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            steps = args.warmup + args.steps
            blocks = torch.randint(0, vocab, (steps * args.global_batch, seq_len + 1),
                                   generator=torch.Generator().manual_seed(0))
            return DataLoader(blocks, batch_size=per_rank)  # Lightning adds the DistributedSampler

    class Probe(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.result: dict[str, Any] = {}

        def on_train_batch_end(self, *unused: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            step_times = [b - a for a, b in zip(self.ends[args.warmup:], self.ends[args.warmup + 1:])]
            optimizer = trainer.optimizers[0]
            state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            fsdp = fsdp_options_of(trainer.strategy)
            precision = str(trainer.precision) if fsdp is None else f"{fsdp.param_dtype} params"
            self.result = {
                "rank": trainer.global_rank,
                "step_s": statistics.median(step_times),
                "param_bytes": sum(local(p).numel() * p.element_size() for p in pl_module.parameters()),
                "optim_bytes": sum(local(t).numel() * t.element_size() for t in state),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "precision": precision.replace("torch.", ""),
                "params": pl_module.model.num_params(),
            }

    register_resolvers()
    module = build_module(cfg, vocab)
    probe = Probe()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, Path(run_dir), [probe], [])
        trainer.fit(module, datamodule=RandomTokens())
    results = [probe.result]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        results = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(results, probe.result)
    if trainer.is_global_zero:
        write_text(args.out, json.dumps({"layout": args.worker, "seq_len": seq_len, "ranks": results}))


def _compose(args: argparse.Namespace, trainer_name: str, ranks: int) -> Any:
    from osp.conf import compose

    overrides = [f"recipe={args.recipe}", f"trainer={trainer_name}", "trainer.accelerator=cpu",
                 f"trainer.max_steps={args.warmup + args.steps}", "optim.warmup_steps=1",
                 "trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
                 "+trainer.enable_progress_bar=false", f"data.batch_size={args.global_batch // ranks}"]
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    return compose(overrides)


# Driver: start the runs, print the table -------------------------------------------------------------------


def _run(layout: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    _, ranks, threads = LAYOUTS[layout]
    worker = ["-m", "osp.bench.distributed", "--worker", layout, "--out", str(out), "--recipe", args.recipe,
              "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--global-batch", str(args.global_batch)]
    if args.seq_len:
        worker += ["--seq-len", str(args.seq_len)]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *launch, *worker], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:  # the ranks' own errors first: torchrun's summary of them comes last
        lines = proc.stderr.splitlines()
        errors = [line for line in lines if "Error" in line or "Exception" in line]
        raise SystemExit(f"osp bench distributed: {layout} failed ({proc.returncode}):\n"
                         + "\n".join([*errors[-10:], "...", *lines[-15:]]))
    return json.loads(out.read_text())


def _format(results: list[dict[str, Any]], args: argparse.Namespace, load: tuple[float, float]) -> str:
    first = results[0]
    mb = 1024**2
    lines = [
        f"osp bench distributed: recipe {args.recipe} ({first['ranks'][0]['params'] / 1e6:.2f}M params), seq "
        f"{first['seq_len']}, global batch {args.global_batch}, median of {args.steps} steps after "
        f"{args.warmup} warm-up",
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} before / {load[1]:.2f} after; "
        f"torch {torch.__version__}, gloo",
        "",
    ]
    table = [["layout", "ranks x threads", "precision", "tokens/s", "step ms", "params MB/rank",
              "optim MB/rank", "peak RSS MB/rank"]]
    rows: dict[str, dict[str, float]] = {}
    for result in results:
        name, ranks = result["layout"], result["ranks"]
        step = max(r["step_s"] for r in ranks)  # the slowest rank sets the pace
        row = {"tokens_per_s": args.global_batch * result["seq_len"] / step, "step_ms": step * 1e3,
               "param_mb": max(r["param_bytes"] for r in ranks) / mb,
               "optim_mb": max(r["optim_bytes"] for r in ranks) / mb,
               "rss_mb": max(r["peak_rss_bytes"] for r in ranks) / mb}
        rows[name] = row
        shape = f"{len(ranks)} x {LAYOUTS[name][2]}"
        table.append([name, shape, ranks[0]["precision"], f"{row['tokens_per_s']:,.0f}",
                      f"{row['step_ms']:.1f}", f"{row['param_mb']:.2f}", f"{row['optim_mb']:.2f}",
                      f"{row['rss_mb']:.0f}"])
    lines += [format_rows(table), ""]
    for base in ("single", "single-1t"):
        if base in rows and "ddp" in rows:
            speedup = rows["ddp"]["tokens_per_s"] / rows[base]["tokens_per_s"]
            lines.append(f"DDP 2 x 1 vs {base} ({LAYOUTS[base][2]} thread(s)): {speedup:.2f}x tokens/s")
    if "ddp" in rows and "fsdp2" in rows:
        params = rows["fsdp2"]["param_mb"] / rows["ddp"]["param_mb"]
        optim = rows["fsdp2"]["optim_mb"] / rows["ddp"]["optim_mb"]
        lines.append(f"FSDP2 vs DDP per rank: parameters {params:.2f}x, optimizer state {optim:.2f}x")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Run the chosen layouts one after another and print the table (rank 0 of each run reports)."""
    args = _parser().parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json")
    if args.worker:
        _worker(args)
        return
    if args.global_batch % 2:
        raise SystemExit("osp bench distributed: --global-batch must be even (it is split over 2 ranks)")
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            print(f"[bench distributed] {layout} ...", flush=True)
            results.append(_run(layout, args, Path(tmp) / f"{layout}.json"))
    table = _format(results, args, (load_before, os.getloadavg()[0]))
    print(table)
    if args.json:
        write_text(args.json, json.dumps({"results": results, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
