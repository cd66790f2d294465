"""`osp bench sweep`: every point is its arm's recipe with exactly the settings it names changed, and a
minuscule sweep trains (in `osp train` subprocesses), resumes, evaluates and reads the table against the
goal."""

from __future__ import annotations

import json
import signal
import threading

import pytest
import torch
from omegaconf import OmegaConf

from osp.bench import sweep
from osp.bench.protocols import evaluate_run
from osp.conf import compose
from osp.errors import DataError
from osp.export import load_model
from osp.precision import autocast_for
from osp.runs import build_pipeline
from tests.support.training import TINY_MODEL_DATA, subprocess_env


def _flat(cfg) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


@pytest.mark.parametrize("point", sweep.POINTS, ids=lambda p: p.name)
def test_a_point_changes_exactly_the_settings_it_names(point, tmp_path):
    unchanged = sweep.Point(point.name, point.arm, "the arm's default")
    base = _flat(compose(sweep.point_overrides(unchanged, tmp_path, [])))
    ran = _flat(compose(sweep.point_overrides(point, tmp_path, [])))
    changed = {k for k in base.keys() | ran.keys() if base.get(k) != ran.get(k)}
    assert changed == {change.split("=", 1)[0] for change in point.changes}
    assert ran["run_name"] == point.name and base["name"] == {"adam": "tiny", "osp": "osp"}[point.arm]
    assert (ran["logger.wandb.enabled"], ran["model.norm"] == "ss") == (False, point.arm == "osp")


def test_points_are_named_by_arm_and_the_goal_pairs_exist():
    names = [p.name for p in sweep.POINTS]
    assert len(set(names)) == len(names)
    assert all(p.name.startswith(f"{p.arm}-") for p in sweep.POINTS)
    for changes in ((), sweep.LONG):  # the default A/B and the longest budget run in both arms
        assert {p.arm for p in sweep.POINTS if p.changes == changes} == set(sweep.ARMS)


def test_extra_overrides_win_and_dry_run_trains_nothing(tmp_path, capsys):
    out = sweep.main(["--points", "adam-lr3e-2", "--out", str(tmp_path), "--set", "optim.lr=1e-3",
                      "--dry-run"])
    (command,) = out["commands"].values()
    assert "optim.lr=1e-3" in command and "optim.lr=3e-2" not in command
    assert capsys.readouterr().out.startswith("osp train recipe=tiny run_name=adam-lr3e-2 ")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--points", "adam-nope"], ["--presets", "bogus"], ["--blocks", "0"],
                                  ["--set", "runs_root=/elsewhere"], ["--set", "+recipe=osp"]])
def test_bad_input_is_one_line(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*argv, "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing trained
    assert exit_info.value.code != 0
    message = str(exit_info.value.code) if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    assert "Traceback" not in message and message.strip()


def fake_osp_train(runs_root, status="finished", calls=None):
    """A stand-in for a point's `osp train` subprocess: writes what Hydra and osp would (overrides,
    summary)."""

    def run(command, out, env):
        if calls is not None:
            calls.append(env)
        overrides = command[command.index("train") + 1:]
        run_dir = runs_root / dict(o.split("=", 1) for o in overrides)["run_name"]
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run_dir / "summary.json").write_text(json.dumps({"status": status, "tokens_seen": 4096}))
        return 0

    return run


def test_jobs_train_points_at_the_same_time_with_their_share_of_the_cores(tmp_path, monkeypatch, capsys):
    both_running = threading.Barrier(2, timeout=30)  # breaks (fails the test) if the points run one by one
    calls = []
    train = fake_osp_train(tmp_path / "runs", calls=calls)
    def run_together(command, out, env):  # noqa: ANN001, ANN202
        both_running.wait()
        return train(command, out, env)

    monkeypatch.setattr(sweep, "_run_child", run_together)
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)

    def evaluate(run_dir, settings):
        if run_dir.name == "osp-base":
            raise DataError("the held-out split is empty")
        return {"ppl_fp": 10.0, "ratios": {"w4a4kv4": 1.0}, "input_max_median": {}, "noise_ratio": 1.0}

    monkeypatch.setattr(sweep, "evaluate_point", evaluate)
    argv = ["--points", "adam-base", "osp-base", "--jobs", "2", "--out", str(tmp_path)]
    payload = sweep.run([*argv, "--presets", "W4A4KV4", "w4a4kv4"])
    assert [env["OMP_NUM_THREADS"] for env in calls] == ["3", "3"]
    assert payload["settings"]["presets"] == ["w4a4kv4"]  # as the protocols name it, once
    assert payload["points"]["adam-base"]["summary"]["status"] == "finished"
    # A point whose evaluation fails is a failed row, and the table is still written.
    assert payload["points"]["osp-base"]["summary"] == {"failed": "evaluation: the held-out split is empty"}
    assert "- osp-base failed: evaluation: the held-out split is empty" in (tmp_path / "sweep.md").read_text()
    capsys.readouterr()
    monkeypatch.setattr(sweep, "_run_child", train)  # one point at a time from here on

    # Run again with other settings: the finished runs are not passed off as trained with them.
    payload = sweep.run([*argv, "--presets", "w4a4kv4", "--set", "optim.lr=1e-3"])
    failed = payload["points"]["adam-base"]["summary"]["failed"]
    assert "was trained with other settings (now: optim.lr=1e-3)" in failed and len(calls) == 2
    # The table keeps every point trained in the folder, also when only some are asked for.
    assert set(sweep.run(["--points", "adam-lr3e-3", "--out", str(tmp_path), "--presets", "w4a4kv4"])[
        "points"]) == {"adam-base", "osp-base", "adam-lr3e-3"}


def test_sigterm_reaches_the_running_points_and_starts_no_other(tmp_path):
    out = (tmp_path / "log").open("w")
    child = threading.Thread(target=lambda: codes.append(sweep._run_child(["sleep", "30"], out, None)))
    codes: list[int] = []
    child.start()
    for _ in range(100):
        if sweep._CHILDREN:
            break
        threading.Event().wait(0.05)
    try:
        sweep._forward_stop(signal.SIGTERM, None)
        child.join(timeout=10)
        assert codes == [-signal.SIGTERM]
        assert sweep.train_point(sweep.POINTS[0], [], tmp_path / "runs", tmp_path / "logs") == {
            "failed": "not trained: the sweep was stopped"}
    finally:
        sweep._STOP.clear()


def test_a_retried_point_keeps_its_earlier_log_and_reports_its_own_failure(tmp_path, monkeypatch):
    attempts = iter(["loss is nan at step 7", "out of memory"])

    def fake_train(command, out, env):
        out.write(f"some progress\n{next(attempts)}\n")
        return 1

    monkeypatch.setattr(sweep, "_run_child", fake_train)
    point = sweep.POINTS[0]
    for reason in ("loss is nan at step 7", "out of memory"):
        failed = sweep.train_point(point, [], tmp_path / "runs", tmp_path / "logs")
        assert failed == {"failed": f"exit 1: {reason}"}
    log = (tmp_path / "logs" / f"{point.name}.log").read_text()
    assert log.count("[sweep] ") == 2 and "loss is nan at step 7" in log and log.endswith("out of memory\n")


def test_relative_noise_has_the_asked_size_per_row():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4096) * torch.logspace(-2, 2, 64)[:, None]  # rows of very different scale
    x[:, 0] = 50.0 * x[:, 1:].pow(2).mean(-1).sqrt()  # and an outlier channel: it counts in the RMS
    noise = sweep.with_relative_noise(x, 0.1, generator) - x
    rms = x.pow(2).mean(-1).sqrt()
    assert (noise.std(-1) / rms).tolist() == pytest.approx([0.1] * 64, rel=0.05)
    assert torch.equal(sweep.with_relative_noise(x, 0.0, generator), x)
    assert sweep.with_relative_noise(x.bfloat16(), 0.1, generator).dtype == torch.bfloat16


def down_proj_max_median(model, ids) -> float:
    """By hand: the mean over layers and tokens of max|x| / median|x| at each down_proj input."""
    ratios = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda _m, args: ratios.append((lambda a: a.amax(-1) / a.median(-1).values)(
            args[0].float().abs()).mean()))
        for layer in model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return float(torch.stack(ratios).mean())


@pytest.mark.slow
def test_a_minuscule_sweep_trains_resumes_and_reads_the_goal(corpus, tmp_path, monkeypatch, auto_precision):
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    broken = sweep.Point("adam-broken", "adam", "a setting that fails", ("optim.eps=2",))
    points = [*sweep.POINTS[:2], broken]
    monkeypatch.setattr(sweep, "POINTS", points)
    monkeypatch.setattr(sweep, "POINT_NAMES", [p.name for p in points])
    extra = [*TINY_MODEL_DATA, f"data.source.paths={corpus['paths']}", f"data.cache_dir={corpus['cache']}",
             "trainer.max_steps=4", "trainer.val_check_interval=4", "optim.warmup_steps=1",
             "callbacks.checkpoint.every_n_train_steps=4", "callbacks.quant_eval.num_blocks=2",
             "callbacks.outliers.n_blocks=2", "callbacks.outliers.plots=false"]
    argv = ["--out", str(tmp_path), "--presets", "w4a4kv4", "w4a4kv4+static", "--blocks", "2",
            "--calib-blocks", "2", "--batch-size", "2", *(a for e in extra for a in ("--set", e))]
    payload = sweep.run([*argv, "--jobs", "2"])

    result = payload["points"]
    broken = result["adam-broken"]
    assert broken["protocols"] is None and "optim.eps" in broken["summary"]["failed"]
    for name in ("adam-base", "osp-base"):
        run = tmp_path / "runs" / name
        assert json.loads((run / "summary.json").read_text()) == result[name]["summary"]
        # The table's ratios are `osp bench protocols`' on the same run, computed again here.
        again = evaluate_run(run, ["w4a4kv4", "w4a4kv4+static"], 2, 2, 2)
        assert again["ratios"] == pytest.approx(result[name]["protocols"]["ratios"], rel=1e-6)
        # Recomputed here at the precision the run recorded, which `auto` resolved in its subprocess.
        precision = result[name]["summary"]["precision"]
        assert precision == {"bf16": "bf16-mixed", "fp32": "32-true"}[auto_precision]
        model, _ = load_model(run, device="cpu")
        held = build_pipeline(run, None, None, None).heldout_blocks(2)
        shape = result[name]["protocols"]["input_max_median"]
        assert set(shape) == {"norm_fed", "o_proj", "down_proj"}
        with autocast_for(precision, "cpu"):
            assert shape["down_proj"] == pytest.approx(down_proj_max_median(model, held[:, :-1]), rel=1e-5)
            # Noise of zero size is no change (the hooks perturb nothing else); the seeded noise gives the
            # table's value.
            assert sweep.noise_ratio(model, held, 2, sigma=0.0) == 1.0
            assert result[name]["protocols"]["noise_ratio"] == sweep.noise_ratio(model, held, 2) != 1.0
    adam, osp = (result[n]["protocols"]["ratios"]["w4a4kv4"] for n in ("adam-base", "osp-base"))
    verdict = "meets" if adam >= 1.5 and osp <= 1.1 else "does not meet"
    reading = "\n".join(payload["reading"])
    assert f"default settings: AdamW {adam:.3f}, OSP {osp:.3f}: {verdict} the goal" in reading
    table = (tmp_path / "sweep.md").read_text()
    assert table.startswith("| point ") and "| adam-broken " in table and "| failed |" in table
    error = "osp train: error: optim.eps=2.0 must be a number in [0.0, 1.0]"
    assert f"- adam-broken failed: exit 1: {error}" in table
    assert json.loads((tmp_path / "sweep.json").read_text())["reading"] == payload["reading"]

    # Run again: nothing is retrained (the summaries are reused, the evaluations read from their cache).
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*.json")}
    with pytest.raises(SystemExit, match=r"osp bench sweep: 1 of 3 points failed \(adam-broken\)"):
        sweep.main(argv)  # the command fails when a point failed (after writing the table)
    assert json.loads((tmp_path / "sweep.json").read_text())["reading"] == payload["reading"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_the_outlier_safe_ffn_points_are_read_against_osp_long_and_the_goal():
    points = {p.name: p for p in sweep.POINTS}
    done = [points["osp-long"], points["osp-long-tail"], points["osp-long-smooth-swiglu"]]
    summary = {"kurtosis_floor": 0.1, "kurtosis_exact": 0.12}
    summaries = {p.name: summary for p in done}
    evaluations = {
        "osp-long": {"ppl_fp": 40.0, "ratios": {"w4a4kv4": 1.17, "w4a4kv4+static": 5.6}},
        "osp-long-tail": {"ppl_fp": 40.6, "ratios": {"w4a4kv4": 1.04, "w4a4kv4+static": 1.4}},
        "osp-long-smooth-swiglu": {"ppl_fp": 40.0, "ratios": {"w4a4kv4": 1.12}},  # no static column
    }
    lines = sweep.ffn_reading(done, summaries, evaluations)
    assert lines[1].endswith("baseline")
    assert ("osp-long-tail: w4a4kv4 1.040, w4a4kv4+static 1.400, ppl / osp-long's 1.015, kurtosis x floor "
            "1.200: meets the goal") in lines[2]
    assert "w4a4kv4 1.120 (misses), w4a4kv4+static - (misses)" in lines[3]
    assert lines[3].endswith("does not meet the goal")
    assert sweep.ffn_reading(done[1:], summaries, evaluations) == []  # nothing to compare with
