"""Hostile inputs found by a generator, not by hand: every config key of `osp train` and every flag of every
command, with values drawn from the key's type and from a list of hostile ones (wrong types, empty, negative,
huge, NaN, paths that escape, Unicode). Each input must end in exit 0 or in one `osp <command>: error:` line
(argparse's usage line plus its error line for a malformed flag), never in a traceback, and must leave every
file of a reference run byte-identical.

The commands run in-process through `osp`'s own entry point (`osp train` up to its checks before Hydra starts:
those decide whether anything is written). `OSP_GENERATED_EXAMPLES` sets how many inputs each test draws
(small in CI; e.g. 2000 on demand:
`OSP_GENERATED_EXAMPLES=2000 pytest tests/reliability/test_generated_inputs.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from osp.conf import compose  # noqa: E402
from tests.support.cli import RUN, snapshot  # noqa: E402
from tests.support.training import tiny_overrides  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("OSP_GENERATED_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

HOSTILE = ["", " ", "-1", "0", "-0.5", "1e400", "1e-400", "nan", "inf", "-inf", "abc", "1.5", "true", "null",
           "[]", "[1,2]", "{a: 1}", "..", "../x", "/", "/sys/osp", "/dev/null", "μ€🙂", "x" * 300,
           "${oc.env:HOME}", "${nope}", "%s", "'", '"', "\\", "a=b", "???", "-m", "99999999999999999999"]


def value_for(current: object) -> st.SearchStrategy[str]:
    """A value for a key whose default is `current`: of its type, or hostile."""
    typed: list[st.SearchStrategy] = [st.sampled_from(HOSTILE)]
    if isinstance(current, bool):
        typed.append(st.sampled_from(["true", "false", "2", "yes"]))
    elif isinstance(current, int):
        typed.append(st.integers(-10**12, 10**12).map(str))
    elif isinstance(current, float):
        typed.append(st.floats(allow_nan=True, allow_infinity=True).map(repr))
    elif isinstance(current, str):
        typed.append(st.text(max_size=20).filter(lambda s: "\n" not in s and "\x00" not in s))
    return st.one_of(typed)


def leaf_keys() -> dict[str, object]:
    cfg = OmegaConf.to_container(compose([]), resolve=False)
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(cfg, "")
    return out


KEYS = leaf_keys()
GROUPS = ["recipe", "model", "optim", "data", "trainer", "logger", "scale", "loss", "callbacks"]
override = st.one_of(
    st.sampled_from(sorted(KEYS)).flatmap(lambda key: value_for(KEYS[key]).map(lambda v: f"{key}={v}")),
    st.sampled_from(GROUPS).flatmap(lambda g: st.sampled_from(HOSTILE).map(lambda v: f"{g}={v}")),
    st.sampled_from(HOSTILE),  # not even key=value
)


def outcome(run, cwd: Path) -> None:  # noqa: ANN001 - a callable that runs one command
    """Run one command in-process from `cwd` (relative paths it writes land there); fail on anything but exit
    0 or a one-line error."""
    err = io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            run()
            code: object = 0
        except SystemExit as stop:
            code = stop.code
        finally:
            os.chdir(here)
    text = err.getvalue()
    assert "Traceback" not in text, text[-3000:]
    if code in (0, None):
        return
    if isinstance(code, str):
        assert code.startswith("osp ") and "\n" not in code.strip(), code
        return
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^osp[\w -]*: error: ", line)]
    assert len(errors) == 1, text[-3000:]
    assert all(line == errors[0] or line.startswith(("usage:", "  ", "warning:"))
               for line in lines), text[-3000:]


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """A copy of the finished tiny run that every drawn command is aimed at (and must leave alone)."""
    root = tmp_path_factory.mktemp("generated")
    shutil.copytree(trained, root / RUN)
    return root / RUN


@SETTINGS
@given(extra=st.lists(override, min_size=1, max_size=3))
def test_train_overrides(corpus, reference, tmp_path_factory, extra):
    from osp.cli.train import start_checks

    before = snapshot(reference)
    args = tiny_overrides(corpus, reference.parent, f"run_name={RUN}", "resume=auto", *extra)

    def run() -> None:
        lock = start_checks(args)
        if lock is not None:
            lock.release()

    outcome(run, tmp_path_factory.mktemp("cwd"))
    assert snapshot(reference) == before


def flags_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]  # noqa: SLF001


def drawn_flags(parser: argparse.ArgumentParser) -> st.SearchStrategy[list[str]]:
    def one(action: argparse.Action) -> st.SearchStrategy[list[str]]:
        flag = st.just(action.option_strings[-1])
        if action.nargs == 0:
            return flag.map(lambda f: [f])
        values = st.sampled_from(list(action.choices)) if action.choices else st.sampled_from(HOSTILE)
        return st.tuples(flag, st.one_of(values, st.sampled_from(HOSTILE))).map(list)

    return st.lists(st.one_of([one(a) for a in flags_of(parser)]), max_size=3).map(
        lambda parts: sum(parts, []))


@SETTINGS
@given(data=st.data())
def test_eval_export_report_plan_flags(reference, tmp_path_factory, data):
    from osp.bench import sweep
    from osp.cli import eval as eval_cli
    from osp.cli import export as export_cli
    from osp.cli import main as osp_main

    before = snapshot(reference)
    out = tmp_path_factory.mktemp("out")
    command = data.draw(st.sampled_from(["eval", "export", "report", "plan", "data", "protocols", "sweep"]))
    if command == "eval":
        argv = [str(reference), "--quant-blocks", "1", "--kurtosis-blocks", "1",
                *data.draw(drawn_flags(eval_cli.build_parser()))]
        run = lambda: osp_main(["eval", *argv])  # noqa: E731
    elif command == "export":
        target = data.draw(st.sampled_from([str(out / "x"), str(reference), str(reference / "tokenizer"),
                                            str(reference / "export"), str(reference / "summary.json"),
                                            "/sys/osp", *HOSTILE[:8]]))
        argv = [str(reference), target, *data.draw(drawn_flags(export_cli.build_parser()))]
        run = lambda: osp_main(["export", *argv])  # noqa: E731
    elif command == "report":
        where = data.draw(st.sampled_from([str(out / "r"), str(reference), str(reference / "csv"),
                                           str(reference / "summary.json"), *HOSTILE[:8]]))
        run = lambda: osp_main(["report", str(reference), "--out", where])  # noqa: E731
    elif command == "plan":
        argv = [*data.draw(st.lists(override, max_size=2)), *data.draw(st.lists(st.sampled_from(
            ["--gpus-per-node", "--mfu", "--vocab-size", "--gpu"]), max_size=1)), *data.draw(
            st.lists(st.sampled_from(HOSTILE), max_size=1))]
        run = lambda: osp_main(["plan", *argv])  # noqa: E731
    elif command == "data":  # never the demo source: it would fetch its corpus
        argv = data.draw(st.one_of(
            st.tuples(st.just("info"), st.sampled_from(["--cache-dir", "--nope"]), st.sampled_from(
                [str(reference / "summary.json"), str(out), *HOSTILE])).map(list),
            st.tuples(st.just("prepare"), st.sampled_from(["--source=files", "--source=nope", "--config"]),
                      st.sampled_from(HOSTILE), st.sampled_from([f"cache_dir={out}", *HOSTILE])).map(list)))
        run = lambda: osp_main(["data", *argv])  # noqa: E731
    elif command == "protocols":
        argv = [str(reference), "--blocks", "1", "--calib-blocks", "1", *data.draw(st.lists(st.sampled_from(
            ["--presets", "--batch-size", "--threads", "--json"]).flatmap(
            lambda f: st.sampled_from([str(reference / "x.json"), *HOSTILE]).map(lambda v: [f, v])),
            max_size=2).map(lambda parts: sum(parts, [])))]
        run = lambda: osp_main(["bench", "protocols", *argv])  # noqa: E731
    else:  # the sweep's flags, without training anything
        argv = ["--dry-run", "--out", str(out), *data.draw(drawn_flags(sweep._parser()))]
        run = lambda: osp_main(["bench", "sweep", *argv])  # noqa: E731
    outcome(run, out)
    assert snapshot(reference) == before
