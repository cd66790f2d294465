"""`osp bench train`: tokens/s of osp's training step vs plain PyTorch and transformers, and callback costs.

Five loops train the same model size with the same batch, precision, AdamW settings and gradient clipping:

  minimal       a hand-written ~40-line Llama (fused QKV and gate/up, SDPA) in a bare loop, torch AdamW
  plain         osp's Transformer in a bare loop, torch AdamW (osp's model without osp's training code)
  transformers  `LlamaForCausalLM` built from osp's export config (same shapes), SDPA attention, torch AdamW
  osp step      LanguageModelModule: its forward and loss, the optimizer and schedule of `optim=...`
  osp fit       the same module under Lightning's `trainer.fit` (loop, hooks, logging), no callbacks

They run interleaved: each repetition runs a few steps of every loop, in a fresh random order; the table
reports the median step. `osp fit` is timed from one batch start to the next, so Lightning's data fetching,
scheduler and logging are in it. The second table is each default callback's cost: one call, timed inside a
real `trainer.fit` with the callback firing every step, divided by its default interval (configs/callbacks).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from osp.bench.optim import machine
from osp.conf import compose
from osp.model import ModelConfig, Transformer
from osp.optim import OptimConfig
from osp.precision import autocast_for
from osp.tables import format_rows
from osp.training.module import LanguageModelModule, next_token_loss

LOOPS = ("minimal", "plain", "transformers", "osp step", "osp fit")
# Default callbacks whose cost is measured: config name -> the interval key in its config (None: every step).
CALLBACKS: dict[str, str | None] = {"outliers": "every_n_steps", "quant_eval": "every_n_steps",
                                    "throughput": None, "stability": None}


# A minimal Llama, the speed reference ----------------------------------------------------------------------

def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split (NeoX) layout, on (B, H, T, head_dim)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class MiniBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up, self.down = nn.Linear(d, 2 * ffn, bias=False), nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class MiniLlama(nn.Module):
    """Pre-norm Llama: RMSNorm, RoPE, causal SDPA, SwiGLU, untied head; no options, no hooks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MiniBlock(cfg.d_model, cfg.n_heads, cfg.ffn_hidden, cfg.norm_eps)
                                    for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        half = cfg.head_dim // 2
        freqs = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, self.cos[:t], self.sin[:t])
        return self.head(self.norm(x))


def hf_llama(cfg: ModelConfig) -> nn.Module:
    """transformers' LlamaForCausalLM with osp's shapes (the config osp's exporter writes), SDPA attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from osp.export.hf import llama_config

    with torch.device("meta"):
        shapes = llama_config(Transformer(cfg), torch.float32)
    fields = {k: v for k, v in shapes.items() if k not in ("architectures", "model_type", "osp")}
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa"))
    model.config.use_cache = False
    return model


# Timed loops ----------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What every loop shares."""

    model_cfg: ModelConfig
    optim_cfg: OptimConfig
    batch: torch.Tensor           # (B, T + 1) on the device
    device: torch.device
    precision: str                # "bf16-mixed" | "32-true"

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.precision, self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def cross_entropy_of(
    forward: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The objective of a plain loop: fp32 next-token cross-entropy of `forward`'s logits on
    a batch (B, T+1)."""
    return lambda batch: next_token_loss(forward(batch[:, :-1]), batch[:, 1:])


class BareLoop:
    """objective (forward, fp32 cross-entropy, any training-only terms) -> backward -> clip -> optimizer (and
    schedule) step, timed per step."""

    def __init__(self, setup: Setup, model: nn.Module, optimizer: torch.optim.Optimizer,
                 objective: Callable[[torch.Tensor], torch.Tensor], scheduler: Any = None) -> None:
        self.setup, self.model, self.optimizer, self.scheduler = setup, model, optimizer, scheduler
        self.objective = objective
        self.params = [p for p in model.parameters() if p.requires_grad]

    def run(self, steps: int) -> list[float]:
        s, times = self.setup, []
        for _ in range(steps):
            s.sync()
            start = time.perf_counter()
            with s.autocast():
                loss = self.objective(s.batch)
            loss.backward()
            if s.optim_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, s.optim_cfg.grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            s.sync()
            times.append(time.perf_counter() - start)
        return times


class FixedBatches(L.LightningDataModule):
    """The same batch every step, and random held-out blocks for the metric callbacks."""

    def __init__(self, batch: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.batch, self.vocab_size = batch.cpu(), vocab_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_Repeat(self.batch), batch_size=None)

    def heldout_blocks(self, n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(n)
        return torch.randint(self.vocab_size, (n, self.batch.shape[1]), generator=generator)


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.batch


class StepTimer(L.Callback):
    """Start-to-start time of every training batch: the whole Lightning step, loop overhead included."""

    def __init__(self, setup: Setup) -> None:
        self.setup, self.starts = setup, []

    def on_train_batch_start(self, *args: Any) -> None:
        self.setup.sync()
        self.starts.append(time.perf_counter())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


class TimedCallback(L.Callback):
    """Runs `inner`'s hooks and adds up the time they take in each training step (one-off hooks excluded)."""

    PER_STEP = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                "on_before_zero_grad", "on_train_batch_end")
    ONCE = ("setup", "on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "teardown")

    def __init__(self, inner: L.Callback, setup: Setup) -> None:
        self.inner, self.bench = inner, setup  # not self.setup: that is a hook name
        self.per_step: list[float] = []
        # Instance attributes shadow Callback's no-op hooks; Lightning looks hooks up with getattr.
        for hook in self.PER_STEP + self.ONCE:
            setattr(self, hook, self._timed(hook))

    def _timed(self, hook: str) -> Callable[..., None]:
        fn = getattr(self.inner, hook)

        def call(*args: Any, **kwargs: Any) -> None:
            if hook == "on_train_batch_start":
                self.per_step.append(0.0)
            self.bench.sync()
            start = time.perf_counter()
            fn(*args, **kwargs)
            self.bench.sync()
            if hook in self.PER_STEP and self.per_step:
                self.per_step[-1] += time.perf_counter() - start

        return call


def lightning_trainer(setup: Setup, steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if setup.device.type == "cuda" else "cpu", devices=1, precision=setup.precision,
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=setup.optim_cfg.grad_clip, callbacks=callbacks,
    )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Lightning's start-up banners and the optimizer table, printed at every fit, would bury the tables."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class FitLoop:
    """One `trainer.fit` per call; the first interval (fresh optimizer state) is not counted."""

    def __init__(self, setup: Setup, module: LanguageModelModule) -> None:
        self.setup, self.module = setup, module
        self.data = FixedBatches(setup.batch, setup.model_cfg.vocab_size)

    def run(self, steps: int) -> list[float]:
        timer = StepTimer(self.setup)
        with quiet():
            lightning_trainer(self.setup, steps + 2, [timer]).fit(self.module, datamodule=self.data)
        return timer.intervals()[1:]


def build_loops(setup: Setup, names: list[str], variants: dict[str, list[str]] | None = None
                ) -> tuple[dict[str, Any], dict[str, int]]:
    """The selected loops (name -> object with run(steps) -> step seconds) and their parameter counts; each
    variant is one more `osp step` loop with its `model.*`, `optim.*` and `loss.*` settings changed."""
    c = setup.optim_cfg

    def torch_adamw(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=c.adamw_lr, betas=c.adamw_betas, eps=c.eps,
                                 weight_decay=c.adamw_weight_decay)

    loops, params = {}, {}
    for name in names:
        if name == "minimal":
            model = MiniLlama(setup.model_cfg).to(setup.device)
            loops[name] = BareLoop(setup, model, torch_adamw(model), cross_entropy_of(model))
        elif name == "plain":
            model = Transformer(setup.model_cfg).to(setup.device)
            loops[name] = BareLoop(setup, model, torch_adamw(model), cross_entropy_of(model))
        elif name == "transformers":
            model = hf_llama(setup.model_cfg).to(setup.device)
            loops[name] = BareLoop(setup, model, torch_adamw(model),
                                   cross_entropy_of(lambda x, m=model: m(input_ids=x).logits))
        elif name == "osp step":
            loops[name], model = osp_step(setup, setup.model_cfg, c, {})
        else:
            module = LanguageModelModule(setup.model_cfg, setup.optim_cfg)
            model = module.model
            loops[name] = FitLoop(setup, module)
        params[name] = sum(p.numel() for p in model.parameters())
    for name, settings in (variants or {}).items():
        model_cfg, optim_cfg, loss = variant_configs(setup, settings)
        loops[name], model = osp_step(setup, model_cfg, optim_cfg, loss)
        params[name] = sum(p.numel() for p in model.parameters())
    return loops, params


def osp_step(setup: Setup, model_cfg: ModelConfig, optim_cfg: OptimConfig, loss: dict[str, Any]
             ) -> tuple[BareLoop, nn.Module]:
    """LanguageModelModule's objective (its forward, loss and loss terms) with its optimizer and schedule."""
    module = LanguageModelModule(model_cfg, optim_cfg, loss=loss).to(setup.device)
    optimizer = optim_cfg.build(module.model)
    scheduler = optim_cfg.build_scheduler(optimizer, total_steps=10**6)
    return (BareLoop(setup, module.model, optimizer, lambda batch: module.objective(batch)[1], scheduler),
            module.model)


def variant_configs(setup: Setup, settings: list[str]) -> tuple[ModelConfig, OptimConfig, dict[str, Any]]:
    """The bench's model and optimizer with `model.KEY=VALUE`, `optim.KEY=VALUE` and `loss.KEY=VALUE`
    applied."""
    from osp.errors import ConfigError

    changes: dict[str, dict[str, Any]] = {"model": {}, "optim": {}, "loss": {}}
    for item in settings:
        key, sep, text = item.partition("=")
        group, _, name = key.partition(".")
        if not sep or group not in changes or not name:
            raise ConfigError(f"--variant setting {item!r}: use model.KEY=VALUE, optim.KEY=VALUE "
                              "or loss.KEY=VALUE")
        changes[group][name] = yaml_value(text)
    model_cfg = ModelConfig.from_dict({**setup.model_cfg.to_dict(), **changes["model"]})
    optim_cfg = OptimConfig.from_dict({**setup.optim_cfg.to_dict(), **changes["optim"]})
    return model_cfg, optim_cfg, changes["loss"]


def yaml_value(text: str) -> Any:
    """A command-line value as YAML reads it (1 -> int, 0.5 -> float, true -> bool, else the string)."""
    import yaml

    return yaml.safe_load(text) if text else text


def time_loops(loops: dict[str, Any], steps: int, reps: int, warmup: int,
               seed: int) -> dict[str, list[float]]:
    """Interleaved: a warm-up round, then `reps` rounds of `steps` steps per loop, each in a new order."""
    rng = random.Random(seed)
    for loop in loops.values():
        loop.run(warmup)
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(reps):
        order = list(loops)
        rng.shuffle(order)
        for name in order:
            times[name] += loops[name].run(steps)
    return times


def callback_costs(setup: Setup, cfg: Any, steps: int) -> list[tuple[str, int, float]]:
    """(callback, default interval, seconds per call) for each default callback, timed in one real fit."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    timed, intervals = {}, {}
    for name, key in CALLBACKS.items():
        node = OmegaConf.to_container(cfg.callbacks[name], resolve=True)
        intervals[name] = int(node[key]) if key else 1
        if key:
            node[key] = 1  # fire every step so each step times one call
        if name == "outliers":
            node["plots"] = False  # plots are drawn once at train end, not per interval
        timed[name] = TimedCallback(instantiate(node), setup)
    module = LanguageModelModule(setup.model_cfg, setup.optim_cfg)
    with quiet():
        trainer = lightning_trainer(setup, steps + 1, list(timed.values()))
        trainer.fit(module, datamodule=FixedBatches(setup.batch, setup.model_cfg.vocab_size))
    # Step 1 is skipped: it also holds one-off work (held-out batch transfer, first quantizer build).
    return [(name, intervals[name], statistics.median(t.per_step[1:])) for name, t in timed.items()]


# Output ---------------------------------------------------------------------------------------------------

def loop_rows(times: dict[str, list[float]], params: dict[str, int], tokens: int) -> list[list[str]]:
    medians = {name: statistics.median(t) for name, t in times.items()}
    reference = medians.get("plain")
    rows = []
    for name in LOOPS:
        if name not in medians:
            continue
        ms = medians[name] * 1e3
        spread = (max(times[name]) - min(times[name])) * 1e3
        rows.append([name, f"{params[name] / 1e6:.2f}M", f"{ms:.1f}", f"±{spread / 2:.1f}",
                     f"{tokens / medians[name]:,.0f}",
                     f"{medians[name] / reference:.2f}x" if reference else "-"])
    return rows


def variant_rows(times: dict[str, list[float]], variants: dict[str, list[str]]) -> list[list[str]]:
    """Each variant's median step against `osp step`'s, timed in the same interleaved rounds."""
    base = statistics.median(times["osp step"])
    rows = [["osp step", "-", f"{base * 1e3:.1f}", "1.000x"]]
    for name, settings in variants.items():
        median = statistics.median(times[name])
        rows.append([name, " ".join(settings), f"{median * 1e3:.1f}", f"{median / base:.3f}x"])
    return rows


def callback_rows(costs: list[tuple[str, int, float]], step_seconds: float) -> list[list[str]]:
    rows, total = [], 0.0
    for name, interval, per_call in costs:
        amortized = per_call / interval
        total += amortized
        rows.append([name, str(interval), f"{per_call * 1e3:.2f}", f"{amortized * 1e3:.3f}",
                     f"{100 * amortized / step_seconds:.2f}%"])
    rows.append(["all four", "", "", f"{total * 1e3:.3f}", f"{100 * total / step_seconds:.2f}%"])
    return rows


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp bench train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--ffn-hidden", type=int, default=768)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--optim", default="adamw", help="optim config of the osp loops (adamw | muon | root)")
    p.add_argument("--precision", choices=("bf16-mixed", "32-true"), default="bf16-mixed")
    p.add_argument("--steps", type=int, default=3, help="timed steps per loop and repetition")
    p.add_argument("--reps", type=int, default=5,
                   help="interleaved repetitions (the median is over all timed steps)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    p.add_argument("--callback-steps", type=int, default=3, help="timed calls per callback")
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS), metavar="LOOP",
                   help=f"loops to time (default: all of {', '.join(repr(n) for n in LOOPS)})")
    p.add_argument("--no-callbacks", action="store_true", help="skip the callback-cost table")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="one more `osp step` loop with model.*, optim.* or loss.* settings changed, timed "
                        "side by side with `osp step` (repeatable), "
                        "e.g. --variant tail loss.ffn_tail_weight=1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time the loops and the callbacks, print both tables; returns the raw numbers."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # No warmup: the schedule must fit into the few steps of each timed fit (lr does not change step time).
    cfg = compose([f"optim={args.optim}", "optim.warmup_steps=0", "logger=none"])
    model_cfg = ModelConfig(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers,
                            n_heads=args.n_heads, ffn_hidden=args.ffn_hidden, max_seq_len=args.seq_len)
    batch = torch.randint(args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    setup = Setup(model_cfg, OptimConfig.from_dict(cfg.optim), batch, device, args.precision)
    tokens = args.batch_size * args.seq_len

    variants = {spec[0]: spec[1:] for spec in args.variant}
    names = list(args.loops) + (["osp step"] if variants and "osp step" not in args.loops else [])
    loops, params = build_loops(setup, names, variants)
    times = time_loops(loops, args.steps, args.reps, args.warmup, args.seed)
    print(f"osp bench train: d {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, "
          f"FFN {args.ffn_hidden}, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len} = "
          f"{tokens:,} tokens, {args.precision}, osp optim={args.optim}, "
          f"grad clip {setup.optim_cfg.grad_clip}; median of {args.reps} x {args.steps} interleaved steps\n"
          f"{machine(device)}\n")
    print(format_rows([["loop", "params", "step ms", "spread", "tokens/s", "vs plain"],
                       *loop_rows(times, params, tokens)]))
    result: dict[str, Any] = {"tokens_per_step": tokens,
                              "loops": {name: statistics.median(t) for name, t in times.items()}}
    if variants:
        print("\nvariants of `osp step` (median step, same interleaved rounds)\n")
        print(format_rows([["loop", "settings", "step ms", "vs osp step"], *variant_rows(times, variants)]))
    if not args.no_callbacks:
        # The callbacks run inside the Lightning loop, so its step is the reference when it was timed.
        timed = result["loops"]
        reference = next(name for name in ("osp fit", "osp step", *timed) if name in timed)
        step = timed[reference]
        costs = callback_costs(setup, cfg, args.callback_steps)
        print(f"\ncallback cost at the default intervals (configs/callbacks), against the "
              f"{step * 1e3:.1f} ms step of `{reference}`\n")
        print(format_rows([["callback", "every", "ms/call", "ms/step", "% of step"],
                           *callback_rows(costs, step)]))
        result["callbacks"] = {name: {"interval": interval, "seconds_per_call": per_call}
                               for name, interval, per_call in costs}
    return result
