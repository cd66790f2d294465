"""`osp bench compile`: `torch.compile` (what `osp train compile=true` runs) against eager, for every block
variant: compile time, step time, graphs, and recompiles after the first training step.

    osp bench compile                    # the block recipes' models at d 128, 2 layers, batch 8 x 128, CPU
    osp bench compile --recipes tiny osp --set model.d_model=256 --set model.n_layers=4

A variant is a recipe's model (recipes/<name>.yaml: tiny is the baseline; ssnorm, embproj,
clipped_softmax, the gated attentions, gated_norm, pre_affine, osp_gated add one mitigation each) with the
sizes of `--set`. Each runs `--steps` training steps (forward, cross-entropy, backward, AdamW step) eager,
then compiled, on the same batches. After the first compiled step Dynamo is told to fail on any recompile, so
a variant whose graph is not stable shows up as an error in its row. Step times are medians of the steps after
the first; "compile s" is the first compiled step minus the eager median. On a shared machine the times move;
the graph counts do not.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from osp.arguments import positive_int
from osp.model import ModelConfig, Transformer
from osp.runs import check_output_file
from osp.tables import format_rows

RECIPES = ("tiny", "ssnorm", "embproj", "clipped_softmax", "gated_attention_head_slice",
           "gated_attention_headwise", "gated_attention_elementwise", "gated_norm", "pre_affine", "osp_gated")
SIZES = ("model.d_model=128", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=384")


def variant_config(recipe: str, overrides: list[str], vocab_size: int, seq_len: int) -> ModelConfig:
    """The model of `recipe` with `overrides` (Hydra syntax), vocabulary and context set here."""
    from omegaconf import OmegaConf

    from osp.conf import compose

    cfg = compose([f"recipe={recipe}", f"data.seq_len={seq_len}", *overrides])
    values = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(values, dict)
    return ModelConfig.from_dict({**values, "vocab_size": vocab_size})


def train_steps(cfg: ModelConfig, batches: list[torch.Tensor], compiled: bool,
                seed: int = 0) -> dict[str, Any]:
    """Train a fresh model (seeded) on `batches`; per-step seconds and losses, and Dynamo's graph counts."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(seed)
    model = Transformer(cfg)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch._dynamo.reset()
    counters.clear()
    seconds, losses, graphs_after_first = [], [], 0
    try:
        for step, batch in enumerate(batches):
            start = time.perf_counter()
            logits = forward(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            if step == 0 and compiled:
                graphs_after_first = counters["stats"]["unique_graphs"]
                torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False
    return {"seconds": seconds, "losses": losses,
            "graphs": counters["stats"]["unique_graphs"] if compiled else 0,
            "graphs_after_first_step": graphs_after_first}


def run(recipes: list[str], overrides: list[str], steps: int, batch_size: int, seq_len: int,
        vocab_size: int = 4096) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
               for _ in range(steps)]
    rows = []
    for recipe in recipes:
        cfg = variant_config(recipe, overrides, vocab_size, seq_len)
        eager = train_steps(cfg, batches, compiled=False)
        row: dict[str, Any] = {"recipe": recipe, "eager_ms": 1e3 * statistics.median(eager["seconds"][1:])}
        try:
            compiled = train_steps(cfg, batches, compiled=True)
        except Exception as err:  # noqa: BLE001 - a failing variant is a result of the benchmark, not a crash
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            print(f"  {recipe}: compile failed: {row['error']}", flush=True)
            continue
        row.update(compiled_ms=1e3 * statistics.median(compiled["seconds"][1:]),
                   compile_s=compiled["seconds"][0] - row["eager_ms"] / 1e3, graphs=compiled["graphs"],
                   recompiles=compiled["graphs"] - compiled["graphs_after_first_step"],
                   max_loss_diff=max(abs(a - b)
                                     for a, b in zip(eager["losses"], compiled["losses"], strict=True)))
        row["speedup"] = row["eager_ms"] / row["compiled_ms"]
        rows.append(row)
        print(f"  {recipe}: compile {row['compile_s']:.1f} s, eager {row['eager_ms']:.1f} ms, compiled "
              f"{row['compiled_ms']:.1f} ms", flush=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    table: list[list[object]] = [["recipe", "compile s", "eager ms", "compiled ms", "speedup", "graphs",
                                  "recompiles", "max |loss diff|"]]
    for r in rows:
        if "error" in r:
            table.append([r["recipe"], "error", f"{r['eager_ms']:.1f}", "-", "-", "-", "-", r["error"]])
            continue
        table.append([r["recipe"], f"{r['compile_s']:.1f}", f"{r['eager_ms']:.1f}", f"{r['compiled_ms']:.1f}",
                      f"{r['speedup']:.2f}x", r["graphs"], r["recompiles"], f"{r['max_loss_diff']:.1e}"])
    return format_rows(table)


def main(argv: list[str]) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="osp bench compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="block recipes (recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model override for every variant (repeatable; default sizes: "
                             + " ".join(SIZES) + ")")
    parser.add_argument("--steps", type=positive_int, default=6)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, "--json")
    if args.steps < 2:
        raise SystemExit("osp bench compile: --steps must be at least 2 (the first one compiles)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from hydra.errors import HydraException

    from osp.errors import ConfigError

    try:
        rows = run(args.recipes, [*SIZES, *args.set], args.steps, args.batch_size, args.seq_len)
    except (HydraException, ConfigError) as err:
        raise SystemExit(f"osp bench compile: {str(err).splitlines()[0]}") from None
    print(f"osp bench compile: {args.steps} training steps of {args.batch_size} x {args.seq_len} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(rows))
    if args.json:
        from osp.atomic import write_json

        write_json(args.json, rows)
    return rows
