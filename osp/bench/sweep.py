"""`osp bench sweep`: which training settings make 4-bit quantization hurt AdamW while OSP stays intact.

    osp bench sweep                        # every point below, then the protocol table (resumable)
    osp bench sweep --jobs 2               # two points at a time, each with half the cores' torch threads
    osp bench sweep --points adam-base osp-base adam-lr3e-2 --dry-run   # the commands only

A point is AdamW (`recipe=tiny`, the default A/B's baseline) or the paper's OSP (`recipe=osp`) with training
settings changed: learning rate, Adam beta2 and epsilon, weight decay (and on norm gains), warmup, width,
depth, token budget. Each point is a plain `osp train` run in a subprocess (`<out>/runs/<point>`, log in
`<out>/logs/`), so `osp report`, `osp eval --attribute` and `osp bench protocols` read it like any run. A
point whose run finished with the same command is not trained again, and an interrupted one continues from its
last checkpoint, so a stopped sweep goes on where it stopped; a run trained with other settings is never
passed off as the point's.

Every trained point of the folder (the asked ones and any trained before) is then evaluated on its own
held-out blocks (cached in its run dir), and the table goes to `<out>/sweep.md` and `<out>/sweep.json`. Its
columns, per point: wall minutes of the run's last `osp train` (cores shared under --jobs), what shapes the
4-bit grid (per-token max/median of the norm-fed and down_proj inputs), how much the model depends on small
activation errors at all (`noise`: perplexity ratio under Gaussian noise of 0.1 x each row's RMS on every
linear input, the size of 4-bit rounding error without outliers), and quantized / full-precision perplexity
under each deployment protocol of `osp bench protocols`. The goal the table is read against: AdamW's ratio >=
1.5 while OSP's stays <= 1.1.

The outlier-safe FFN points (`osp-long-*`) are OSP at the longest budget with a remedy for the SwiGLU output's
tail; the reading compares each with osp-long against GOAL_FFN (docs/outlier_safe_ffn.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import OmegaConf

from osp.arguments import positive_int
from osp.atomic import write_json, write_text
from osp.bench.paper_table import merge_overrides
from osp.bench.protocols import DEFAULT_PRESETS
from osp.tables import format_rows

# The two arms of the default A/B: d 256, 4 layers, 300 steps x 16 x 256 = 1.2M tokens, lr 1e-2, warmup 30.
ARMS = {"adam": "recipe=tiny", "osp": "recipe=osp"}
GOAL = {"adam": 1.5, "osp": 1.1}  # AdamW's ratio at least, OSP's at most


@dataclass(frozen=True)
class Point:
    """One sweep run: an arm, the settings it changes from the A/B default, and the axis it probes."""

    name: str
    arm: str
    axis: str
    changes: tuple[str, ...] = ()


def _pair(name: str, axis: str, *changes: str) -> list[Point]:
    return [Point(f"{arm}-{name}", arm, axis, changes) for arm in ARMS]


LONG = ("trainer.max_steps=2000", "trainer.val_check_interval=500",
        "callbacks.checkpoint.every_n_train_steps=500")
FFN_AXIS = "outlier-safe FFN"
# An outlier-safe FFN variant meets the goal when, against osp-long: per-token W4A4 without an online rotation
# <= 1.05, static W4A4 <= 1.5, fp perplexity within 2%, kurtosis still <= 1.5 x the Gaussian floor (and
# <= 3% more step time, measured side by side by `osp bench train --variant`, not here).
GOAL_FFN = {"w4a4kv4": 1.05, "w4a4kv4+static": 1.5, "ppl_fp": 1.02, "kurtosis_floor_ratio": 1.5}

POINTS: list[Point] = [
    *_pair("base", "default A/B"),
    Point("adam-lr3e-3", "adam", "learning rate", ("optim.lr=3e-3",)),
    Point("adam-lr3e-2", "adam", "learning rate", ("optim.lr=3e-2",)),
    Point("adam-beta2-0.999", "adam", "Adam beta2", ("optim.betas=[0.9,0.999]",)),
    Point("adam-eps1e-12", "adam", "Adam epsilon", ("optim.eps=1e-12",)),
    Point("adam-wd0", "adam", "weight decay", ("optim.weight_decay=0",)),
    Point("adam-decay-gains", "adam", "decay on gains",
          ("optim.decayed_roles=[embedding,head,matrix,gain]",)),
    Point("adam-warmup0", "adam", "warmup", ("optim.warmup_steps=0",)),
    Point("adam-depth8", "adam", "depth", ("model.n_layers=8",)),
    Point("adam-width512", "adam", "width",
          ("model.d_model=512", "model.n_heads=8", "model.ffn_hidden=1536")),
    # The longest budget, in both arms: 2000 steps x 4096 tokens = 8.2M tokens (6.7x the A/B), under 60
    # minutes per arm on 2 cores; a checkpoint every 500 steps keeps the token-budget curve (`osp bench
    # protocols` on each checkpoint).
    *_pair("long", "token budget", *LONG),
    # AdamW at a learning rate it trains well at, for the longest budget: do outliers grow in a well-trained
    # AdamW model too?
    Point("adam-long-lr3e-3", "adam", "token budget at AdamW's lr", (*LONG, "optim.lr=3e-3")),
    # The outlier-safe FFN: OSP at the longest budget with each remedy for the SwiGLU output's tail (read
    # against osp-long, GOAL_FFN). Smooth-SwiGLU trains exactly as osp-long and folds per-channel scales into
    # the export; the tail loss penalizes down_proj-input entries beyond 4 x the RMS of the layer's input
    # (tensor) or of their token (token).
    Point("osp-long-smooth-swiglu", "osp", FFN_AXIS, (*LONG, "model.smooth_swiglu=true")),
    Point("osp-long-tail", "osp", FFN_AXIS, (*LONG, "loss.ffn_tail_weight=1", "loss.ffn_tail_scale=tensor")),
    Point("osp-long-tail-token", "osp", FFN_AXIS, (*LONG, "loss.ffn_tail_weight=1")),
    Point("osp-long-tail-w10", "osp", FFN_AXIS,
          (*LONG, "loss.ffn_tail_weight=10", "loss.ffn_tail_scale=tensor")),
]
POINT_NAMES = [p.name for p in POINTS]


# The overrides by which the sweep names and places each point's run: --set may not change them.
RESERVED = ("run_name", "runs_root", "run_dir", "resume", "recipe")


def point_overrides(point: Point, runs_root: Path, extra: list[str]) -> list[str]:
    """The `osp train` command line of a point: its arm's recipe, its changes, then --set (which win).
    resume=auto: a point that was interrupted continues from its last checkpoint when the sweep is run
    again."""
    base = [ARMS[point.arm], f"run_name={point.name}", f"runs_root={runs_root}", "logger=none", "resume=auto",
            *point.changes]
    return merge_overrides(base, extra)


def train_point(point: Point, overrides: list[str], runs_root: Path, logs: Path,
                threads: int | None = None) -> dict[str, Any]:
    """Train one point with `osp train` in a subprocess (or read back the summary of a finished run); returns
    the summary, or {"failed": the last line of its log} when the run did not finish. `threads` sets the
    subprocess's torch threads (OMP_NUM_THREADS); None leaves torch's choice."""
    summary_file = runs_root / point.name / "summary.json"
    done = _finished(summary_file)
    if done is None and _STOP.is_set():
        return {"failed": "not trained: the sweep was stopped"}
    if done is not None:
        other = _other_settings(runs_root / point.name, overrides)
        if other:
            reason = (f"{runs_root / point.name} was trained with other settings ({other}); remove it, or "
                      "sweep into another --out")
            print(f"[sweep] {point.name}: {reason}", flush=True)
            return {"failed": reason}
        print(f"[sweep] {point.name}: finished before, reusing {summary_file}", flush=True)
        return done
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{point.name}.log"
    command = [sys.executable, "-m", "osp", "train", *overrides]
    print(f"[sweep] {point.name}: osp train {' '.join(shlex.quote(o) for o in overrides)}  (log: {log})",
          flush=True)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with log.open("a") as out:  # a resumed point's log continues its interrupted one
        out.write(f"[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} osp train {' '.join(overrides)}\n")
        out.flush()
        attempt_starts = out.tell()
        code = _run_child(command, out, env)
    done = _finished(summary_file)
    if code == 0 and done is not None:
        print(f"[sweep] {point.name}: trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        return done
    with log.open("rb") as out:
        out.seek(attempt_starts)
        lines = [line for line in out.read().decode(errors="replace").splitlines() if line.strip()]
    status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    reason = f"{status}: {lines[-1].strip()}" if lines else status
    print(f"[sweep] {point.name}: failed ({reason})", flush=True)
    return {"failed": reason}


# A SIGTERM to the sweep (`kill`, a batch system's time limit) reaches the `osp train` children too: they
# save a checkpoint and stop (osp's preemption handling), no further point starts, and running the same
# command again continues. (Ctrl-C reaches them already: a terminal signals the whole process group.)
_STOP = threading.Event()
_CHILDREN: set[subprocess.Popen] = set()


def _run_child(command: list[str], out: IO[str], env: dict[str, str] | None) -> int:
    with subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=env) as child:
        _CHILDREN.add(child)
        try:
            return child.wait()
        finally:
            _CHILDREN.discard(child)


def _forward_stop(signum: int, _frame: object) -> None:
    _STOP.set()
    for child in list(_CHILDREN):
        child.send_signal(signum)


def _finished(summary_file: Path) -> dict[str, Any] | None:
    """The summary of a run that reached its last step (a preempted run's says status "stopped"; an unreadable
    one counts as unfinished, and `osp train resume=auto` continues the run)."""
    try:
        summary = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "finished" else None


def _other_settings(run_dir: Path, overrides: list[str]) -> str:
    """How the `osp train` overrides a run was started with (Hydra's .hydra/overrides.yaml) differ from
    `overrides`; empty when they are the same."""
    try:
        recorded = [str(o) for o in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")]
    except (OSError, ValueError):
        return "no .hydra/overrides.yaml"
    gone, new = sorted(set(recorded) - set(overrides)), sorted(set(overrides) - set(recorded))
    return "; ".join(part for part in (f"then: {' '.join(gone)}" if gone else "",
                                       f"now: {' '.join(new)}" if new else "") if part)


def input_shape(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """What the 4-bit grid sees at the quantized linear inputs on `ids` (B, T), averaged over the layers:
    "input_max_median" per kind of input (osp.metrics.INPUT_KINDS: norm-fed, o_proj, down_proj), the per-token
    max|x| / median|x| of He et al. (the median entry lands 7.5 / ratio steps from zero, so above ~15 most
    entries round to zero; a Gaussian input gives 4.6 at width 256 and 5.0 at 768); the down_proj input's
    top-8 channel share (near 1: channel-concentrated, near 8 / width: spread over tokens); and the gate/up
    row alignment (osp.metrics.outliers.gate_up_alignment)."""
    from osp.metrics.activations import input_kind, outlier_stats

    stats = outlier_stats(model, ids, "context", linear_inputs=True)
    by_kind: dict[str, list[dict[str, float]]] = {}
    for name, site in stats["linear_inputs"].items():
        kind = input_kind(name)
        if kind is not None:
            by_kind.setdefault(kind, []).append(site)
    downs = by_kind.get("down_proj", [])
    alignment = stats["gate_up_alignment"]
    return {"input_max_median": {kind: sum(s["max_median"] for s in sites) / len(sites)
                                 for kind, sites in by_kind.items()},
            "down_proj_channel_share": sum(s["channel_share"] for s in downs) / len(downs) if downs else None,
            "gate_up_alignment": sum(alignment) / len(alignment) if alignment else None}


# Per-token asymmetric INT4 of Gaussian rows leaves an error of 0.109 (width 256) to 0.12 (width 768) x the
# row's RMS (measured), so noise of 0.1 x RMS is 4-bit-sized activation error as it would be without
# outliers widening the grid.
NOISE_SIGMA = 0.1
# What evaluate_point computes; a cached evaluation of another version is computed again.
EVALUATION_VERSION = 4


def with_relative_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """x plus Gaussian noise whose std is `sigma` times each row's RMS (over the last dim)."""
    xf = x.float()
    rms = xf.pow(2).mean(-1, keepdim=True).sqrt()
    noise = torch.randn(xf.shape, generator=generator, device=x.device)
    return (xf + sigma * rms * noise).to(x.dtype)


def noise_ratio(model: torch.nn.Module, held: torch.Tensor, batch_size: int,
                sigma: float = NOISE_SIGMA) -> float:
    """Perplexity on held-out blocks (N, T+1) with `with_relative_noise` on every linear input inside the
    blocks / without (seeded; q/k/v and gate/up, which read one tensor, get the same noisy copy as they would
    get the same quantized one): how much the model depends on small activation errors, whatever its
    outliers. A model that loses little here loses little to 4-bit activations unless outliers widen the
    grid."""
    from osp.quant import perplexity

    generator = torch.Generator().manual_seed(0)
    last: list[torch.Tensor | None] = [None, None]  # the last input seen and its noisy copy

    def add_noise(_module: torch.nn.Module, args: tuple) -> tuple:
        if args[0] is not last[0]:
            last[0], last[1] = args[0], with_relative_noise(args[0], sigma, generator)
        return (last[1], *args[1:])

    clean = perplexity(model, held, batch_size=batch_size)
    hooks = [m.register_forward_pre_hook(add_noise)
             for layer in model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    try:
        noisy = perplexity(model, held, batch_size=batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return noisy / clean


def evaluate_point(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The protocol ratios, linear-input shape and noise sensitivity of a trained point; cached in the run dir
    for the same evaluation settings and the same training (its summary)."""
    from osp.bench.protocols import load_run, protocol_ratios
    from osp.precision import autocast_for

    key = {**settings, "version": EVALUATION_VERSION,
           "summary_sha256": hashlib.sha256((run_dir / "summary.json").read_bytes()).hexdigest()}
    cache = run_dir / "protocols.json"
    try:
        stored = json.loads(cache.read_text())
        if stored.get("settings") == key:
            return stored["result"]
    except (OSError, ValueError, AttributeError):  # none yet, or unreadable: evaluate again
        pass
    run = load_run(run_dir, settings["presets"], settings["blocks"], settings["calib_blocks"])
    result = protocol_ratios(run, settings["presets"], settings["batch_size"])
    with autocast_for(run.precision, "cpu"):  # the numerics the run trained with, as the protocols use
        result.update(input_shape(run.model, run.held[:, :-1]))
        result["noise_ratio"] = noise_ratio(run.model, run.held, settings["batch_size"],
                                            settings["noise_sigma"])
    write_json(cache, {"settings": key, "result": result})
    return result


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(points: list[Point], summaries: dict[str, dict[str, Any]], evaluations: dict[str, dict[str, Any]],
          presets: list[str], markdown: bool = False) -> str:
    rows: list[list[object]] = [["point", "axis", "changes", "M tokens", "min", "ppl fp", "kurt ×floor",
                                 "max|h|", "max/med norm-fed", "max/med down", "top-8 down", "gate/up",
                                 "noise", *presets]]
    for p in points:
        s, e = summaries[p.name], evaluations.get(p.name)
        floor, exact = s.get("kurtosis_floor"), s.get("kurtosis_exact")
        changes = " ".join(p.changes) or "-"
        if e is None:  # the reading says why
            rows.append([p.name, p.axis, changes, "-", "-", "failed", *["-"] * 7, *["-"] * len(presets)])
            continue
        rows.append([p.name, p.axis, f"`{changes}`" if markdown and p.changes else changes,
                     _cell(s.get("tokens_seen") and s["tokens_seen"] / 1e6, ".3g"),
                     _cell(s.get("wall_seconds") and s["wall_seconds"] / 60, ".0f"),
                     f"{e['ppl_fp']:.2f}",
                     _cell(exact / floor if exact is not None and floor else None, ".1f"),
                     _cell(s.get("max_abs"), ".4g"), _cell(e["input_max_median"].get("norm_fed"), ".1f"),
                     _cell(e["input_max_median"].get("down_proj"), ".1f"),
                     _cell(e.get("down_proj_channel_share"), ".2f"), _cell(e.get("gate_up_alignment"), ".2f"),
                     _cell(e.get("noise_ratio"), ".3f"),
                     *(f"{e['ratios'][q]:.3f}" for q in presets)])
    return format_rows(rows, markdown=markdown)


def reading(points: list[Point], summaries: dict[str, dict[str, Any]], evaluations: dict[str, dict[str, Any]],
            presets: list[str]) -> list[str]:
    """What the numbers say against the goal: the points that failed, and per protocol the largest AdamW
    ratio and every setting trained in both arms with whether it meets AdamW >= 1.5 while OSP <= 1.1."""
    lines = [f"- {p.name} failed: {summaries[p.name]['failed']}" for p in points if p.name not in evaluations]
    done = [p for p in points if p.name in evaluations]
    for preset in presets:
        ratio = {p.name: evaluations[p.name]["ratios"][preset] for p in done}
        adamw = [p for p in done if p.arm == "adam"]
        if adamw:
            worst = max(adamw, key=lambda p: ratio[p.name])
            lines.append(f"- {preset}: AdamW's largest ratio {ratio[worst.name]:.3f} at {worst.name} "
                         f"(goal >= {GOAL['adam']})")
        for p in done:
            twin = next((q for q in done if q.arm == "osp" and q.changes == p.changes), None)
            if p.arm != "adam" or twin is None:
                continue
            a, o = ratio[p.name], ratio[twin.name]
            met = a >= GOAL["adam"] and o <= GOAL["osp"]
            lines.append(f"  - {' '.join(p.changes) or 'default settings'}: AdamW {a:.3f}, OSP {o:.3f}: "
                         f"{'meets' if met else 'does not meet'} the goal")
    return lines + ffn_reading(done, summaries, evaluations)


def ffn_reading(done: list[Point], summaries: dict[str, dict[str, Any]],
                evaluations: dict[str, dict[str, Any]]) -> list[str]:
    """Each outlier-safe FFN point against osp-long and GOAL_FFN (what each criterion measured, and whether it
    holds; n/a where a protocol was not evaluated)."""
    variants = [p for p in done if p.axis == FFN_AXIS]
    base = next((p for p in done if p.name == "osp-long"), None)
    if not variants or base is None:
        return []
    base_ppl = evaluations["osp-long"]["ppl_fp"]
    lines = ["- outlier-safe FFN against osp-long (goal: w4a4kv4 <= 1.05, w4a4kv4+static <= 1.5, fp "
             "perplexity within 2%, kurtosis <= 1.5x the floor; step time: osp bench train --variant):"]
    for p in [base, *variants]:
        e, s = evaluations[p.name], summaries[p.name]
        floor, exact = s.get("kurtosis_floor"), s.get("kurtosis_exact")
        measured = {"w4a4kv4": e["ratios"].get("w4a4kv4"),
                    "w4a4kv4+static": e["ratios"].get("w4a4kv4+static"),
                    "ppl_fp": e["ppl_fp"] / base_ppl,
                    "kurtosis_floor_ratio": exact / floor if exact is not None and floor else None}
        parts, met = [], True
        for key, value in measured.items():
            ok = value is not None and value <= GOAL_FFN[key]
            met &= ok
            label = {"ppl_fp": "ppl / osp-long's", "kurtosis_floor_ratio": "kurtosis x floor"}.get(key, key)
            parts.append(f"{label} {_cell(value, '.3f')}{'' if ok else ' (misses)'}")
        verdict = ("baseline" if p.name == "osp-long" else
                   "meets the goal" if met else "does not meet the goal")
        lines.append(f"  - {p.name}: {', '.join(parts)}: {verdict}")
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="osp bench sweep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="points:\n" + "\n".join(
                                    f"  {pt.name:20s} {pt.axis}: {' '.join(pt.changes) or '-'}"
                                    for pt in POINTS))
    p.add_argument("--points", nargs="+", choices=POINT_NAMES, default=POINT_NAMES, metavar="POINT",
                   help="points to train and evaluate, in the sweep's order (default: all)")
    p.add_argument("--out", type=Path, default=Path("sweep"),
                   help="output folder (runs/, logs/, sweep.md, sweep.json)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `osp train` override for every point (repeatable), e.g. --set data=files "
                        "--set data.source.paths='corpus/*.txt'")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="points trained at the same time, each with cores/jobs torch threads (on 2 cores, "
                        "--jobs 2 trains ~25%% more tokens per second than one 2-thread run)")
    p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), help="quant presets (columns)")
    p.add_argument("--blocks", type=positive_int, default=16, help="held-out blocks per evaluation")
    p.add_argument("--calib-blocks", type=positive_int, default=32, help="training blocks for static scales")
    p.add_argument("--batch-size", type=positive_int, default=4, help="blocks per evaluation forward pass")
    p.add_argument("--dry-run", action="store_true", help="print each point's `osp train` command and stop")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`osp bench sweep`: `run`, then a non-zero exit when a point asked for failed (the table is written all
    the same, with the failure in its reading)."""
    payload = run(argv)
    asked = payload.get("asked", [])
    failed = [name for name in asked if "failed" in payload["points"][name]["summary"]]
    if failed:
        raise SystemExit(f"osp bench sweep: {len(failed)} of {len(asked)} points failed "
                         f"({', '.join(failed)}); see the reading in sweep.md")
    return payload


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or reuse) the asked points, evaluate every trained point of the folder, write the table; returns
    what sweep.json holds (and "asked": the points of this invocation)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from osp.errors import OspError, QuantConfigError
    from osp.quant.evaluation import eval_config

    try:  # as the protocols name them (w16a16 -> fp, W4A4KV4 -> w4a4kv4), each once
        args.presets = list(dict.fromkeys(eval_config(preset).name for preset in args.presets))
    except QuantConfigError as err:
        raise SystemExit(f"osp bench sweep: --presets: {err}") from None
    reserved = sorted({o.split("=", 1)[0].lstrip("+~") for o in args.extra} & set(RESERVED))
    if reserved:
        raise SystemExit(f"osp bench sweep: --set {reserved[0]}=... is the sweep's own setting (it names and "
                         "places each point's run); use --out to put the sweep elsewhere")
    out = args.out
    runs_root = out / "runs"  # as given: the printed commands run from the same folder
    # The table covers the asked points and every other point already trained in this sweep folder.
    points = [p for p in POINTS if p.name in args.points or _finished(runs_root / p.name / "summary.json")]
    commands = {p.name: point_overrides(p, runs_root, args.extra) for p in points}
    if args.dry_run:
        for p in points:
            if p.name in args.points:
                print("osp train " + " ".join(shlex.quote(o) for o in commands[p.name]))
        return {"commands": {name: command for name, command in commands.items() if name in args.points}}

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.jobs) if args.jobs > 1 else None
    previous = signal.signal(signal.SIGTERM, _forward_stop)
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            trained = pool.map(lambda p: train_point(p, commands[p.name], runs_root, out / "logs", threads),
                               points)
            summaries = dict(zip([p.name for p in points], trained))
    finally:
        signal.signal(signal.SIGTERM, previous)
    if _STOP.is_set():
        _STOP.clear()
        raise SystemExit("osp bench sweep: stopped by SIGTERM; the interrupted points saved a checkpoint: "
                         "run the same command again to continue")
    settings = {"presets": args.presets, "blocks": args.blocks, "calib_blocks": args.calib_blocks,
                "batch_size": args.batch_size, "noise_sigma": NOISE_SIGMA}
    evaluations = {}
    for p in points:
        if "failed" in summaries[p.name]:
            continue
        print(f"[sweep] {p.name}: protocols", flush=True)
        try:
            evaluations[p.name] = evaluate_point(runs_root / p.name, settings)
        except OspError as err:
            summaries[p.name] = {"failed": f"evaluation: {err}"}
    notes = reading(points, summaries, evaluations, args.presets)
    print("\n" + table(points, summaries, evaluations, args.presets) + "\n\n" + "\n".join(notes))
    markdown = table(points, summaries, evaluations, args.presets, markdown=True) + "\n\n" + "\n".join(notes)
    write_text(out / "sweep.md", markdown + "\n")
    payload = {"settings": settings, "goal": GOAL, "reading": notes,
               "points": {p.name: {"arm": p.arm, "axis": p.axis, "changes": list(p.changes),
                                   "command": "osp train " + " ".join(
                                       shlex.quote(o) for o in commands[p.name]),
                                   "summary": summaries[p.name], "protocols": evaluations.get(p.name)}
                          for p in points}}
    write_json(out / "sweep.json", payload)
    print(f"written: {out / 'sweep.md'}, {out / 'sweep.json'}")
    return {**payload, "asked": [p.name for p in points if p.name in args.points]}
