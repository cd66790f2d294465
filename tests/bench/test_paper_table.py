"""`osp bench paper-table`: arms compose from the paper recipes, the paper's numbers are the README's, and a
minuscule two-arm run prints and writes the table."""

import json
import math

import pytest

from osp.bench import paper_table
from osp.bench.paper_table import (
    ARMS,
    FFN_HEADER,
    HEADER,
    PAPER_D_MODEL,
    arm_overrides,
    compose,
    ffn_rows,
    kendall_tau,
    merge_overrides,
    reading,
    result_row,
    scale_facts,
    table_rows,
)
from osp.metrics import gaussian_floor
from osp.optim import OptimConfig
from osp.training.run import build_model_config
from tests.support.cli import REPO
from tests.support.synthetic_text import write_corpus

# The OSP README ablation table (1.4B, 100B tokens): Ex.Kurt, 16-16-16 PPL, 4-4-4 PPL RTN -> Had,
# 4-4-4 Avg RTN -> Had, 16-16-16 Avg.
SPEC = {
    "adam": (1818.56, 11.4, 8e4, 3e4, 26.8, 26.9, 41.5),
    "muon_only": (361.35, 11.7, 8e5, 24.8, 26.3, 33.1, 41.0),
    "muon": (1575.12, 11.4, 1e4, 15.8, 29.0, 38.4, 41.5),
    "muon_ssnorm": (66.69, 11.2, 44.2, 34.1, 36.4, 38.3, 41.8),
    "muon_embproj": (703.23, 12.3, 114.6, 22.3, 30.4, 36.2, 40.0),
    "osp": (0.04, 11.2, 19.6, 13.5, 37.5, 38.9, 41.4),
}
TINY_DATA = ["data=files", "data.vocab_size=384", "data.source.val_fraction=0.1"]


def test_paper_numbers_are_the_readme_values():
    assert [arm for arm in ARMS if ARMS[arm].paper] == list(SPEC)  # the paper's row order
    assert [arm for arm in ARMS if ARMS[arm].paper is None] == ["osp_ffn_tail"]  # osp's own, last
    for arm, (kurt, ppl_fp, ppl_rtn, ppl_had, avg_rtn, avg_had, avg_fp) in SPEC.items():
        p = ARMS[arm].paper
        assert (p.kurtosis, p.ppl_fp, p.ppl_rtn, p.ppl_had) == (kurt, ppl_fp, ppl_rtn, ppl_had)
        assert (p.avg_rtn, p.avg_had, p.avg_fp) == (avg_rtn, avg_had, avg_fp)


README = REPO / "docs" / "results.md"


def readme_table_rows(header: list[str] = HEADER) -> list[list[str]]:
    """The arm rows of every results-page table with `header`'s columns (the main table, or with FFN_HEADER
    the down_proj table), as cells."""
    labels = {arm.label for arm in ARMS.values()}
    rows = []
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.replace("\\|", "/").strip().strip("|").split("|")]
        if cells[0] in labels and len(cells) == len(header):
            rows.append(cells)
    return rows


def test_table_prints_the_paper_numbers_as_the_readme():
    results = {arm: result_row({}) for arm in ARMS}  # nothing measured: only the paper columns are filled
    rows = table_rows(results, paper_floor=gaussian_floor(PAPER_D_MODEL))
    paper = {row[0]: row[HEADER.index("paper kurt"):] for row in rows[1:]}
    readme = readme_table_rows()
    assert len(readme) == 2 * len(ARMS)  # the default-scale and the smoke-scale tables
    for cells in readme:
        assert len(cells) == len(HEADER) and cells[HEADER.index("paper kurt"):] == paper[cells[0]], cells[0]
    assert paper["Adam"][:2] == ["1818.56", "4.4e4"] and paper["OSP (all)"][:2] == ["0.04", "0.966"]
    assert paper["OSP + FFN tail loss"] == ["-"] * 5  # not in the paper
    assert all(row[HEADER.index("kurt exact")] == "-" for row in rows[1:])


def test_results_page_has_both_tables_of_every_arm_at_both_scales():
    for header in (HEADER, FFN_HEADER):
        labels = [cells[0] for cells in readme_table_rows(header)]
        assert labels == 2 * [arm.label for arm in ARMS.values()], header[1]


# configs/scale/cpu.yaml, written out: d_model, n_layers, n_heads, ffn_hidden, seq_len, batch_size, steps, lr
CPU_SCALE = (256, 4, 4, 768, 256, 16, 600, 1e-2)


@pytest.mark.parametrize("arm", list(ARMS))
def test_arm_is_its_recipe_at_cpu_scale(arm, tmp_path):
    cfg = compose(arm_overrides(arm, "cpu", tmp_path, seed=1, export=False))
    facts = scale_facts(cfg)
    assert tuple(facts[k] for k in ("d_model", "n_layers", "n_heads", "ffn_hidden", "seq_len", "batch_size",
                                    "steps", "lr")) == CPU_SCALE
    model = build_model_config(cfg, vocab_size=4096)
    recipe = ARMS[arm]
    assert (model.d_model, model.n_layers, model.ffn_hidden) == (256, 4, 768)
    assert (model.norm == "ss", model.emb_proj) == (recipe.ssnorm, recipe.embproj)
    optim = OptimConfig.from_dict(cfg.optim)
    assert optim.name == ("adamw" if arm == "adam" else "muon") and optim.lr == 1e-2
    assert (optim.routing["embedding"] == "muon") == (arm == "muon_only")
    assert cfg.data.source.kind == "demo" and cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.max_steps == 600 and cfg.trainer.val_check_interval == 600
    assert cfg.callbacks.quant_eval.every_n_steps == 600  # QuantEval once, at the end
    assert cfg.run_dir == f"{tmp_path}/{arm}"
    assert cfg.callbacks.checkpoint is None and "export" not in cfg.callbacks
    assert list(cfg.callbacks.quant_eval.extra_presets) == ["w4a4kv4+had", "w4a16"]


@pytest.mark.parametrize("scale", ["test", "cpu-small", "cpu", "gpu"])
def test_one_arm_is_an_osp_train_command(scale, tmp_path):
    # `osp train recipe=muon scale=<scale>` is the Muon arm, apart from its run folder; the run records
    # its recipe's own name (so its summary does not take it for the demo A/B's `osp` or `tiny`).
    from omegaconf import OmegaConf

    arm = compose(arm_overrides("muon", scale, tmp_path, seed=1234, export=True))
    by_hand = compose(["recipe=muon", f"scale={scale}", f"runs_root={tmp_path}", "run_name=muon"])
    assert OmegaConf.to_container(arm, resolve=True) == OmegaConf.to_container(by_hand, resolve=True)


def test_ffn_table_and_reading_compare_the_down_proj_input():
    def summary(max_median, ppl_w4a4, kurtosis_exact):
        return {"down_proj_max_median": max_median, "down_proj_kurtosis": 12.0,
                "down_proj_channel_share": 0.2, "gate_up_alignment": 0.4, "ppl_fp": 40.0,
                "ppl_w4a4": ppl_w4a4, "ppl_w4a4kv4_had": 42.0, "kurtosis_exact": kurtosis_exact}

    results = {"adam": result_row(summary(300.0, 50.0, 9.0)), "osp": result_row(summary(114.0, 46.8, 0.1)),
               "osp_ffn_tail": result_row(summary(28.1, 44.9, 0.2)),
               "muon_only": result_row({"diverged": "nan"})}
    rows = ffn_rows(results)
    assert rows[0] == FFN_HEADER and len({len(r) for r in rows}) == 1
    assert rows[2] == ["OSP (all)", "114", "12.0", "0.20", "0.40", "1.17", "1.05"]  # 46.8 / 40, 42 / 40
    assert rows[4][:2] == ["Muon-Only†", "diverged"]
    notes = "\n".join(reading(results))
    assert "Kendall tau over 2 arms" in notes  # the tail-loss arm has no paper value to rank against
    assert "down_proj input max/median, the arms in the paper's order: Adam 300, OSP (all) 114" in notes
    tail_line = ("OSP + FFN tail loss against OSP (all): down_proj input max/median 114 → 28.1, "
                 "W4A4/fp 1.17 → 1.12")
    assert tail_line in notes


def test_kendall_tau_compares_orderings():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([1], [5]) is None


def test_extra_overrides_replace_the_scale_ones():
    merged = merge_overrides(["data=demo", "model.d_model=8", "~callbacks.export"], ["data=files", "+x=1"])
    assert merged == ["model.d_model=8", "~callbacks.export", "data=files", "+x=1"]


def test_paper_table_end_to_end_at_test_scale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OSP_CACHE_DIR", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["--scale", "test", "--arms", "osp", "adam", "--out", str(out),
            *(x for o in [*TINY_DATA, f"data.source.paths={corpus}"] for x in ("--set", o))]
    payload = paper_table.main(args)
    printed = capsys.readouterr().out

    assert list(payload["arms"]) == ["adam", "osp"]  # table order, not command-line order
    header = next(line for line in printed.splitlines() if line.startswith("arm "))
    for column in ("kurt ctx", "kurt exact", "floor", "max|h|", "ppl fp", "W4A4 RTN → Had", "paper kurt",
                   "paper 4-4-4 PPL RTN → Had"):
        assert column in header
    lines = printed.splitlines()
    rows: dict[str, str] = {}  # each arm's row in the main table (the down_proj table repeats the labels)
    for line in lines:
        if line.startswith(("Adam", "OSP")):
            rows.setdefault(line.split("  ")[0].strip(), line)
    assert "1818.56" in rows["Adam"] and "8e4 → 3e4" in rows["Adam"] and "26.8 → 26.9" in rows["Adam"]
    assert " 0.04 " in rows["OSP (all)"] and "19.6 → 13.5" in rows["OSP (all)"]
    headers = [line for line in lines if line.startswith("arm ")]
    assert len(headers) == 2 and "down_proj in max/med" in headers[1]  # the down_proj table follows

    written = json.loads((out / "paper_table.json").read_text())
    assert written["scale"]["name"] == "test"
    tokens = {arm["ours"]["tokens_seen"] for arm in written["arms"].values()}
    # scale "test": the same budget for every arm
    assert tokens == {10 * 8 * 64} == {written["scale"]["tokens"]}
    for name, arm in written["arms"].items():
        ours = arm["ours"]
        for key in ("val_loss", "kurtosis", "kurtosis_exact", "kurtosis_floor", "max_abs", "ppl_fp",
                    "ppl_w4a4", "ppl_w4a4_had", "ppl_w4a16"):
            assert math.isfinite(ours[key]), key
        assert arm["command"].startswith(f"osp train recipe={ARMS[name].recipe} ")
    assert written["arms"]["osp"]["paper"]["kurtosis"] == 0.04
    assert (out / "paper_table.md").read_text().startswith("### OSP ablation table")
    assert (out / "plots" / "kurtosis_mean.png").is_file() and (out / "plots" / "max_abs.png").is_file()
    for name in ("adam", "osp"):  # each run records its recipe, so its summary offers no demo A/B command
        assert json.loads((out / "runs" / name / "summary.json").read_text())["recipe"] == ARMS[name].recipe
    assert "A/B  " not in printed
    assert not (out / "runs" / "adam" / "checkpoints").exists()

    # --reuse rebuilds the table from the run directories without training again.
    again = paper_table.main([*args, "--reuse"])
    assert again["arms"]["osp"]["ours"] == payload["arms"]["osp"]["ours"]
    assert "reusing" in capsys.readouterr().out
