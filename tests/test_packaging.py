"""What `pip install` of a wheel gets: every package of the tree, configs/ and recipes/ as osp/configs and
osp/recipes, and a tiny `osp train` whose numbers equal the checkout's."""

from __future__ import annotations

import json
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib

from tests.support.training import subprocess_env, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_is_the_tree_plus_configs_and_recipes():
    tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "osp").rglob("__init__.py")}
    assert set(SETUPTOOLS["packages"]) == tree | {"osp.configs", "osp.recipes"}
    assert SETUPTOOLS["package-dir"] == {"osp.configs": "configs", "osp.recipes": "recipes"}


def test_every_config_file_is_package_data():
    for package, folder in SETUPTOOLS["package-dir"].items():
        globs = SETUPTOOLS["package-data"][package]
        shipped = {p for pattern in globs for p in (REPO / folder).glob(pattern)}
        files = {p for p in (REPO / folder).rglob("*") if p.is_file()}
        assert files and files <= shipped, sorted(str(p) for p in files - shipped)


def _train(python: str, corpus: dict[str, str], root: Path, name: str, cwd: Path) -> dict:
    args = tiny_overrides(corpus, root, "recipe=osp", "trainer.max_steps=4", "trainer.val_check_interval=4",
                          "callbacks.checkpoint.every_n_train_steps=4", "~callbacks.export",
                          f"run_name={name}")
    proc = subprocess.run([python, "-m", "osp", "train", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / name / "summary.json").read_text())


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_trains_as_the_checkout(corpus, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("osp-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    # The dependencies (torch, lightning, ...) come from this interpreter's site-packages, after the venv's
    # own.
    fresh_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                                capture_output=True, text=True).stdout.strip()
    Path(fresh_site, "osp_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    where = subprocess.run([python, "-c", "import osp.conf; print(osp.conf.__file__, osp.conf.RECIPE_DIR)"],
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert where.startswith(fresh_site) and "osp/recipes" in where  # the wheel's files, not the checkout's

    installed = _train(python, corpus, tmp_path / "runs", "wheel", cwd=tmp_path)
    checkout = _train(sys.executable, corpus, tmp_path / "runs", "checkout", cwd=REPO)
    for key in ("steps", "train_loss", "val_loss", "kurtosis", "ppl_w4a4", "optimizer", "norm"):
        assert installed[key] == checkout[key], key
