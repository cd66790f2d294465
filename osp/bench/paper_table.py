"""`osp bench paper-table`: the OSP paper's ablation table (arXiv 2506.19697), re-run at small scale.

Every arm is one of the paper recipes (recipes/adam_1p4b.yaml, muon_only, muon, muon_ssnorm,
muon_embproj, osp_1p4b, and osp's own osp_ffn_tail_1p4b, which the paper does not have) with the model
shrunk and the data, token budget and learning rate of the chosen
`--scale` (configs/scale/<name>.yaml, so `osp train recipe=muon scale=cpu-small` re-runs one arm); the
arms differ only in what the recipe ablates. Each arm is a real `osp train` run (same config composition,
same callbacks: OutlierMonitor during training, QuantEval at the end), so its run directory works with
`osp report` and `osp eval`. The table puts our kurtosis (both modes, with the Gaussian floor), max|h|,
fp and W4A4 perplexities (RTN, and with the down-projection Hadamard) next to the paper's 1.4B/100B numbers;
a second table shows the input of every arm's down-projection (the linear input that carries most of the W4A4
loss of an outlier-safe model), so that it tells which of OSP's measures shapes it.

The CPU scales use lr 1e-2: at lr 3e-3 a run this short shows no AdamW outliers yet, and (as He et al. 2024
report for outlier features) a higher learning rate is the knob that makes them appear within minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from osp.atomic import write_text
from osp.bench.optim import machine
from osp.conf import CONFIG_DIR, compose, presets
from osp.tables import format_rows


@dataclass(frozen=True)
class PaperRow:
    """One row of the OSP README ablation table (1.4B, 100B tokens; 4-4-4 = W4A4KV4, RTN weights).

    ppl_* are WikiText-2 perplexities; avg_* the 10-benchmark average; *_had with the FFN (down_proj)
    Hadamard. ppl_fp/avg_fp (16-16-16) come from HTML comments in the README (not rendered there).
    """

    kurtosis: float
    ppl_fp: float
    ppl_rtn: float
    ppl_had: float
    avg_fp: float
    avg_rtn: float
    avg_had: float


@dataclass(frozen=True)
class Arm:
    """A table row: what the paper calls it, the recipe that defines it, and the paper's numbers (None for an
    arm of osp's own that the paper does not have)."""

    label: str
    recipe: str
    optimizer: str
    ssnorm: bool
    embproj: bool
    paper: PaperRow | None


# Row order and values of the ablation table in the OSP README (dmis-lab/Outlier-Safe-Pre-Training); the
# 16-16-16 columns are in HTML comments there.
ARMS: dict[str, Arm] = {
    "adam": Arm("Adam", "adam_1p4b", "AdamW", False, False,
                PaperRow(1818.56, 11.4, 8e4, 3e4, 41.5, 26.8, 26.9)),
    "muon_only": Arm("Muon-Only†", "muon_only", "Muon (also emb.)", False, False,
                     PaperRow(361.35, 11.7, 8e5, 24.8, 41.0, 26.3, 33.1)),
    "muon": Arm("Muon", "muon", "Muon", False, False,
                PaperRow(1575.12, 11.4, 1e4, 15.8, 41.5, 29.0, 38.4)),
    "muon_ssnorm": Arm("Muon+SSNorm", "muon_ssnorm", "Muon", True, False,
                       PaperRow(66.69, 11.2, 44.2, 34.1, 41.8, 36.4, 38.3)),
    "muon_embproj": Arm("Muon+EmbProj", "muon_embproj", "Muon", False, True,
                        PaperRow(703.23, 12.3, 114.6, 22.3, 40.0, 30.4, 36.2)),
    "osp": Arm("OSP (all)", "osp_1p4b", "Muon", True, True,
               PaperRow(0.04, 11.2, 19.6, 13.5, 41.4, 37.5, 38.9)),
    # osp's addition (docs/outlier_safe_ffn.md): OSP + the FFN tail loss on the down_proj input.
    "osp_ffn_tail": Arm("OSP + FFN tail loss", "osp_ffn_tail_1p4b", "Muon", True, True, None),
}
PAPER_D_MODEL = 2048  # the paper's width: its kurtosis floor is gaussian_floor(2048) ~ 0.04


def scale_facts(cfg: Any) -> dict[str, Any]:
    """Model size, token budget and optimizer settings that a scale (configs/scale/) gives every arm."""
    facts = {"d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
             "ffn_hidden": cfg.model.ffn_hidden, "seq_len": cfg.data.seq_len,
             "batch_size": cfg.data.batch_size, "steps": cfg.trainer.max_steps, "lr": cfg.optim.lr,
             "warmup_steps": cfg.optim.warmup_steps}
    return {**facts, "tokens": facts["steps"] * facts["batch_size"] * facts["seq_len"]}


def scale_description(scale: str) -> str:
    """The first paragraph of the scale file's leading comment (after `# @package`), as one line."""
    text = []
    for line in (CONFIG_DIR / "scale" / f"{scale}.yaml").read_text().splitlines()[1:]:
        if not line.startswith("# "):  # a bare "#" ends the paragraph, as does the first key
            break
        text.append(line[2:])
    return " ".join(text)


def arm_overrides(arm: str, scale: str, runs_root: Path, seed: int, export: bool) -> list[str]:
    """The `osp train` command line of one arm: its paper recipe at this scale
    (configs/scale/<scale>.yaml)."""
    overrides = [f"recipe={ARMS[arm].recipe}", f"scale={scale}", f"run_name={arm}",
                 f"runs_root={runs_root}", f"seed={seed}"]
    if not export:
        overrides.append("~callbacks.export")
    return overrides


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """base + extra; an extra override replaces a base one of the same key (Hydra rejects duplicates)."""
    replaced = {_override_key(o) for o in extra}
    return [o for o in base if _override_key(o) not in replaced] + list(extra)


def run_arm(arm: str, overrides: list[str], run_dir: Path, reuse: bool) -> dict[str, Any]:
    """Train one arm in this process (or read its summary back with --reuse); returns the summary."""
    from osp.errors import ConfigError
    from osp.training.callbacks.stability import NonFiniteLossError
    from osp.training.run import train

    summary_path = run_dir / "summary.json"
    if reuse and summary_path.is_file():
        print(f"[paper-table] {arm}: reusing {summary_path}")
        return json.loads(summary_path.read_text())
    print(f"[paper-table] {arm}: osp train {' '.join(shlex.quote(o) for o in overrides)}", flush=True)
    try:
        return train(compose(overrides))
    except NonFiniteLossError as error:
        # An unstable arm is a result (Muon-Only† is the fragile one), not a reason to lose the others.
        print(f"[paper-table] {arm}: diverged: {error}", flush=True)
        return {"diverged": str(error)}
    except ConfigError as error:  # e.g. the arm's run dir holds an earlier run: never overwritten
        raise SystemExit(f"[paper-table] {arm}: {error} (or pass --reuse to take its summary)") from None


# Table ---------------------------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 3) -> str:
    """Compact number: `digits` significant digits; 1e4 and above in the paper's '8e4' style (2 digits)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 1e4:
        return f"{value:.2g}".replace("e+0", "e").replace("e+", "e")
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.1e}"
    # '#' keeps trailing zeros (65.0, not 65) so every cell shows `digits` significant digits.
    return f"{value:#.{digits}g}".rstrip(".") if abs(value) < 10 ** digits else f"{value:.0f}"


def _pair(a: float | None, b: float | None, fmt: Callable[[float], str] = _num) -> str:
    return f"{fmt(a)} → {fmt(b)}"


def _paper(value: float, decimals: int = 1) -> str:
    """A paper value as the README prints it: 8e4 (rounded there), else with its decimals (29.0, 1818.56)."""
    return f"{value:.0e}".replace("e+0", "e") if value >= 1e4 else f"{value:.{decimals}f}"


def result_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The measured numbers of one arm, named as in the JSON output."""
    floor = summary.get("kurtosis_floor")
    exact = summary.get("kurtosis_exact")
    return {
        "val_loss": summary.get("val_loss"),
        "kurtosis": summary.get("kurtosis"),
        "kurtosis_exact": exact,
        "kurtosis_floor": floor,
        "kurtosis_exact_x_floor": exact / floor if exact is not None and floor else None,
        "max_abs": summary.get("max_abs"),
        "ppl_fp": summary.get("ppl_fp"),
        "ppl_w4a4": summary.get("ppl_w4a4"),
        "ppl_w4a4_had": summary.get("ppl_w4a4kv4_had"),
        "ppl_w4a16": summary.get("ppl_w4a16"),
        "w4a4_ratio": summary.get("quant_ratio"),
        "down_proj_max_median": summary.get("down_proj_max_median"),
        "down_proj_kurtosis": summary.get("down_proj_kurtosis"),
        "down_proj_channel_share": summary.get("down_proj_channel_share"),
        "gate_up_alignment": summary.get("gate_up_alignment"),
        "tokens_seen": summary.get("tokens_seen"),
        "wall_seconds": summary.get("wall_seconds"),
        "diverged": summary.get("diverged"),
    }


HEADER = ["arm", "optimizer", "SSNorm", "EmbProj", "val loss", "kurt ctx", "kurt exact", "floor", "×floor",
          "max|h|", "ppl fp", "W4A4 RTN → Had", "W4A16", "paper kurt", "paper ×floor", "paper ppl fp",
          "paper 4-4-4 PPL RTN → Had", "paper 4-4-4 Avg RTN → Had"]


def _paper_cells(p: PaperRow | None, paper_floor: float) -> list[str]:
    if p is None:
        return ["-"] * 5
    return [_paper(p.kurtosis, 2), _num(p.kurtosis / paper_floor), _paper(p.ppl_fp),
            _pair(p.ppl_rtn, p.ppl_had, _paper), _pair(p.avg_rtn, p.avg_had, _paper)]


def table_rows(results: dict[str, dict[str, Any]], paper_floor: float) -> list[list[str]]:
    rows = [HEADER]
    for arm, r in results.items():
        a = ARMS[arm]
        rows.append([
            a.label, a.optimizer, "✔" if a.ssnorm else "✗", "✔" if a.embproj else "✗",
            "diverged" if r["diverged"] else _num(r["val_loss"]), _num(r["kurtosis"]),
            _num(r["kurtosis_exact"]), _num(r["kurtosis_floor"]), _num(r["kurtosis_exact_x_floor"]),
            _num(r["max_abs"]), _num(r["ppl_fp"]),
            _pair(r["ppl_w4a4"], r["ppl_w4a4_had"]), _num(r["ppl_w4a16"]),
            *_paper_cells(a.paper, paper_floor),
        ])
    return rows


FFN_HEADER = ["arm", "down_proj in max/med", "kurtosis", "top-8 channel share", "gate/up alignment",
              "W4A4 / fp", "W4A4 Had / fp"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ffn_rows(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The down_proj input of every arm (from its summary, osp.training.summary), beside its W4A4 ratios."""
    rows = [FFN_HEADER]
    for arm, r in results.items():
        if r["diverged"]:
            rows.append([ARMS[arm].label, "diverged", *["-"] * (len(FFN_HEADER) - 2)])
            continue
        rows.append([ARMS[arm].label, _num(r["down_proj_max_median"]), _num(r["down_proj_kurtosis"]),
                     _num(r["down_proj_channel_share"], 2), _num(r["gate_up_alignment"], 2),
                     _num(_ratio(r["ppl_w4a4"], r["ppl_fp"])), _num(_ratio(r["ppl_w4a4_had"], r["ppl_fp"]))])
    return rows


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Rank agreement of two orderings (tau-a): +1 same order, -1 reversed; None for fewer than two items."""
    n = len(x)
    products = [(x[i] - x[j]) * (y[i] - y[j]) for i in range(n) for j in range(i + 1, n)]
    if not products:
        return None
    return sum((p > 0) - (p < 0) for p in products) / len(products)


def reading(results: dict[str, dict[str, Any]]) -> list[str]:
    """Plain statements of what this table shows, computed from the numbers (no interpretation baked in)."""
    lines = []
    for arm, r in results.items():
        if r["diverged"]:
            lines.append(f"- {ARMS[arm].label}: diverged ({r['diverged']})")
            continue
        parts = []
        if r["kurtosis_exact_x_floor"] is not None:
            parts.append(f"kurtosis (osp_exact) {r['kurtosis_exact_x_floor']:.1f}× the Gaussian floor")
        if r["max_abs"] is not None:
            parts.append(f"max|h| {_num(r['max_abs'])}")
        if r["ppl_fp"] and r["ppl_w4a4"]:
            parts.append(f"W4A4 RTN costs {100 * (r['ppl_w4a4'] / r['ppl_fp'] - 1):+.1f}% ppl")
        if r["ppl_fp"] and r["ppl_w4a4_had"]:
            parts.append(f"+Had {100 * (r['ppl_w4a4_had'] / r['ppl_fp'] - 1):+.1f}%")
        lines.append(f"- {ARMS[arm].label}: " + ", ".join(parts))
    paper = {arm: p for arm in results if (p := ARMS[arm].paper) is not None}  # osp's own arms have none
    measured = [arm for arm, r in results.items()
                if r["kurtosis_exact"] is not None and not r["diverged"] and arm in paper]
    tau = kendall_tau([results[a]["kurtosis_exact"] for a in measured], [paper[a].kurtosis for a in measured])
    if tau is not None:
        lines.append(f"- Kurtosis order vs the paper's (Kendall tau over {len(measured)} arms): {tau:+.2f} "
                     "(+1 = same order)")
    ratios = [a for a in measured if results[a]["w4a4_ratio"] is not None]
    tau_q = kendall_tau([results[a]["w4a4_ratio"] for a in ratios],
                        [paper[a].ppl_rtn / paper[a].ppl_fp for a in ratios])
    if tau_q is not None:
        lines.append(f"- W4A4/fp ppl order vs the paper's (Kendall tau): {tau_q:+.2f}")
    shaped = [a for a in measured if results[a]["down_proj_max_median"] is not None]
    if shaped:
        lines.append("- down_proj input max/median, the arms in the paper's order: " + ", ".join(
            f"{ARMS[a].label} {_num(results[a]['down_proj_max_median'])}" for a in shaped))
    base, tail = results.get("osp"), results.get("osp_ffn_tail")
    if base and tail and not base["diverged"] and not tail["diverged"]:
        shape = _pair(base["down_proj_max_median"], tail["down_proj_max_median"])
        w4a4 = _pair(_ratio(base["ppl_w4a4"], base["ppl_fp"]), _ratio(tail["ppl_w4a4"], tail["ppl_fp"]))
        lines.append(f"- {ARMS['osp_ffn_tail'].label} against {ARMS['osp'].label}: down_proj input "
                     f"max/median {shape}, W4A4/fp {w4a4}, fp ppl {_pair(base['ppl_fp'], tail['ppl_fp'])}")
    return lines


def write_plots(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Comparison plots of the arms (kurtosis and max|h| against step) via `osp report`'s writer."""
    from osp.errors import RunDirError
    from osp.metrics.report import load_run, write_report

    runs = []
    for path in run_dirs:
        try:
            runs.append(load_run(path))
        except RunDirError as error:  # an arm that diverged before logging anything
            print(f"[paper-table] no curves for {path.name}: {error}")
    return write_report(runs, out_dir) if runs else []


# Entry point ---------------------------------------------------------------------------------------------

def scales_help() -> str:
    """Each scale's size, token budget and lr (composed from its file) and its description."""
    lines = ["scales (configs/scale/; one arm: osp train recipe=muon scale=NAME):"]
    for name in presets("scale"):
        f = scale_facts(compose(["recipe=osp_1p4b", f"scale={name}"]))
        lines.append(f"  {name:10s} d {f['d_model']}, {f['n_layers']} layers, {f['steps']} steps x "
                     f"{f['batch_size']} x {f['seq_len']} = {f['tokens'] / 1e6:.2f}M tokens, "
                     f"lr {f['lr']:g}:\n  {'':10s} {scale_description(name)}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Composes the scales for the epilog only when help is printed, not at every start."""

    def format_help(self) -> str:
        self.epilog = scales_help()
        return super().format_help()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="osp bench paper-table", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=presets("scale"), default="cpu")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), metavar="ARM",
                   help=f"arms to train, in table order (default: all of {', '.join(ARMS)})")
    p.add_argument("--out", type=Path, default=Path("paper_table"),
                   help="output folder: runs/<arm>/, paper_table.md, paper_table.json, plots/")
    p.add_argument("--steps", type=int, default=None,
                   help="override the scale's step count (trainer.max_steps)")
    p.add_argument("--lr", type=float, default=None, help="override the scale's learning rate (optim.lr)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every arm (repeatable), e.g. --set data=files "
                        "--set data.source.paths='corpus/*.txt'")
    p.add_argument("--reuse", action="store_true",
                   help="do not retrain arms whose run dir has a summary.json (re-render the table)")
    p.add_argument("--export", action="store_true", help="keep each arm's Hugging Face export (for osp eval)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a machine shared with "
                        "other jobs, where multi-threaded ops wait for a free core)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the arms, print and write the table; returns the JSON payload."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    changes = [f"{key}={value}" for key, value in (("trainer.max_steps", args.steps), ("optim.lr", args.lr))
               if value is not None]
    arms = [arm for arm in ARMS if arm in args.arms]  # table order, whatever the command-line order
    out = args.out.resolve()
    runs_root = out / "runs"
    reused = [arm for arm in arms if args.reuse and (runs_root / arm / "summary.json").is_file()]
    started = time.perf_counter()

    summaries: dict[str, dict[str, Any]] = {}
    commands: dict[str, list[str]] = {}
    for arm in arms:
        base = arm_overrides(arm, args.scale, runs_root, args.seed, args.export)
        overrides = merge_overrides(base, [*changes, *args.extra])
        commands[arm] = overrides
        summaries[arm] = run_arm(arm, overrides, runs_root / arm, args.reuse)
    wall = time.perf_counter() - started
    cfg = compose(commands[arms[0]])  # the scale's facts, as every arm ran them
    scale = scale_facts(cfg)
    accelerator = str(cfg.trainer.get("accelerator"))
    device = torch.device("cuda" if accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu")

    from osp.metrics import gaussian_floor

    results = {arm: result_row(summaries[arm]) for arm in arms}
    paper_floor = gaussian_floor(PAPER_D_MODEL)
    rows = table_rows(results, paper_floor)
    ffn = ffn_rows(results)
    notes = reading(results)
    tokens = results[arms[0]]["tokens_seen"]
    title = (f"OSP ablation table at scale '{args.scale}': d {scale['d_model']}, {scale['n_layers']} layers, "
             f"{scale['steps']} steps, {tokens or scale['tokens']:,} tokens per arm, lr {scale['lr']:g} "
             f"(paper: 1.4B, d {PAPER_D_MODEL}, 100B tokens; paper floor {paper_floor:.3f})")
    legend = ("kurt ctx / kurt exact: OSP per-token excess kurtosis, normal sequences / each token alone "
              "(the paper's mode); floor: Gaussian floor at this width; ×floor = kurt exact / floor; "
              "ppl: perplexity on held-out blocks of the run's data (paper: WikiText-2); W4A4 = w4a4kv4 RTN, "
              "Had = + online Hadamard on the down_proj input.")
    ffn_title = "The down_proj input of every arm (held-out blocks, at the end of training)"
    ffn_legend = ("max/med: per-token max |x| / median |x|, averaged over layers (4-bit per-token grids lose "
                  "the small entries when it is large); kurtosis: of the entries; top-8 channel share: how "
                  "often a token's largest entry falls in the layer's 8 most frequent channels (high: a "
                  "per-channel scale removes the tail; low: it is spread over tokens); gate/up alignment: "
                  "mean |cos| of matching gate_proj and up_proj rows (aligned rows make a quadratic tail).")
    print("\n" + title + "\n\n" + format_rows(rows) + "\n\n" + legend + "\n\n" + ffn_title + "\n\n"
          + format_rows(ffn) + "\n\n" + ffn_legend + "\n\n" + "\n".join(notes))
    print(f"\nwall time {wall / 60:.1f} min ({len(arms) - len(reused)} arms trained, {len(reused)} reused) "
          f"on {machine(device)}")

    out.mkdir(parents=True, exist_ok=True)
    markdown = "\n\n".join([f"### {title}", format_rows(rows, markdown=True), legend, f"#### {ffn_title}",
                             format_rows(ffn, markdown=True), ffn_legend, "\n".join(notes)])
    write_text(out / "paper_table.md", markdown + "\n")
    payload = {
        "scale": {"name": args.scale, "description": scale_description(args.scale), **scale},
        "wall_seconds": wall,  # this invocation (small with --reuse)
        "train_seconds": sum(r["wall_seconds"] or 0.0 for r in results.values()),  # the arms' own runs
        "machine": machine(device),
        "paper_floor": paper_floor,
        "arms": {arm: {"label": ARMS[arm].label, "recipe": ARMS[arm].recipe,
                       "command": "osp train " + " ".join(shlex.quote(o) for o in commands[arm]),
                       "ours": results[arm], "paper": None if (p := ARMS[arm].paper) is None else asdict(p)}
                 for arm in arms},
        "reading": notes,
    }
    write_text(out / "paper_table.json", json.dumps(payload, indent=2) + "\n")  # table order, not sorted
    plots = write_plots([runs_root / arm for arm in arms], out / "plots")
    print("written: " + ", ".join(str(p) for p in [out / "paper_table.md", out / "paper_table.json", *plots]))
    return payload
