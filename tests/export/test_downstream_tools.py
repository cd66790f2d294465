"""The README's downstream tools on an export: lm-eval with the shipped offline tasks, llmcompressor one-shot.

The checks of the shipped files (task YAMLs and their data, the script's --help and its missing-package
error) always run. The lm-eval and llmcompressor runs are skipped where those packages are absent (they are
not osp dependencies: install them in their own environment, see docs/export.md); they take seconds on a
tiny export and need no network.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from osp.export import export_hf
from tests.support.cli import REPO
from tests.support.export import tiny_config, trained_like

TASK_DIR = REPO / "examples" / "lm_eval"
SCRIPT = REPO / "examples" / "llmcompressor_oneshot.py"
TASKS = {"osp_prose_ppl": "loglikelihood_rolling", "osp_cloze_mc": "multiple_choice"}


def task_config(name: str) -> dict:
    return yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text())


def task_docs(name: str) -> list[dict]:
    path = REPO / task_config(name)["dataset_kwargs"]["data_files"]["test"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def export_dir(tmp_path, tokenizer) -> Path:
    """A tiny plain-Llama export; max_seq_len 128 so each shipped passage is one lm-eval rolling window."""
    return export_hf(trained_like(tiny_config(max_seq_len=128)), tmp_path / "export", tokenizer=tokenizer)


# ---------------------------------------------------------------- always: the shipped files


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_yaml_parses_and_its_data_exists(name):
    config = task_config(name)
    assert config["task"] == name and config["output_type"] == TASKS[name]
    assert config["dataset_path"] == "json" and config["test_split"] == "test"
    data = REPO / config["dataset_kwargs"]["data_files"]["test"]  # relative to the repo root (lm_eval's cwd)
    assert data.is_file(), f"{name}: {data} is missing"
    docs = task_docs(name)
    assert len(docs) >= 10
    for field in re.findall(r"{{\s*(\w+)\s*}}", " ".join(str(config.get(k, "")) for k in
                                                          ("doc_to_text", "doc_to_target", "doc_to_choice"))):
        assert all(field in doc for doc in docs), f"{name}: a document lacks {field!r}"
    if TASKS[name] == "multiple_choice":
        labels = [doc["label"] for doc in docs]
        assert all(0 <= doc["label"] < len(doc["choices"]) for doc in docs)
        assert 0.3 <= sum(lab == 0 for lab in labels) / len(labels) <= 0.7  # a constant guess is no shortcut


def test_llmcompressor_script_help_needs_no_llmcompressor():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], check=False, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--scheme" in out.stdout and all(s in out.stdout for s in ("W4A16", "W4A4", "W8A8"))
    assert "--calib-file" in out.stdout and "--calib-run" in out.stdout


def test_llmcompressor_script_says_in_one_line_that_llmcompressor_is_missing(tmp_path):
    blocked = tmp_path / "blocked" / "llmcompressor"  # shadows an installed llmcompressor
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'llmcompressor'\", "
                                         "name='llmcompressor')\n")
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "export"), str(tmp_path / "out")],
                         check=False, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(blocked.parent)})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        ("llmcompressor_oneshot: llmcompressor is not installed (llmcompressor); pip install llmcompressor "
         "(preferably in a separate virtual environment)")]


# ---------------------------------------------------------------- optional: lm-eval


def test_lm_eval_word_perplexity_is_the_exports_own(export_dir, tokenizer, monkeypatch):
    """lm-eval's word perplexity on the shipped passages equals exp(-sum log p / words) computed directly from
    the exported model (one rolling window per passage, prefixed with the BOS id). The word-level test
    tokenizer reads the English passages as mostly <unk>; the comparison still pins lm-eval's loading of the
    export, its window and prefix, and the word count of the shipped task."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(REPO)  # the task's data path is relative to the repo root, as in the README command
    model_args = {"pretrained": str(export_dir), "dtype": "float32"}
    results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=list(TASKS), device="cpu",
                                      batch_size=1, task_manager=TaskManager(include_path=str(TASK_DIR)))
    results = results["results"]
    ppl = results["osp_prose_ppl"]["word_perplexity,none"]

    hf = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    total, words = 0.0, 0
    for doc in task_docs("osp_prose_ppl"):
        ids = tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
        assert len(ids) < hf.config.max_position_embeddings  # one window, so no rolling to reproduce
        inputs = torch.tensor([[tokenizer.bos_token_id, *ids]])
        with torch.no_grad():
            logp = hf(inputs).logits[0, :-1].log_softmax(-1)
        total += logp.gather(1, inputs[0, 1:, None]).sum().item()
        words += len(re.split(r"\s+", doc["text"]))
    assert math.isfinite(ppl) and ppl > 1
    assert ppl == pytest.approx(math.exp(-total / words), rel=1e-4)
    acc = results["osp_cloze_mc"]["acc,none"]
    assert acc * len(task_docs("osp_cloze_mc")) == pytest.approx(round(acc * len(task_docs("osp_cloze_mc"))))


# ---------------------------------------------------------------- optional: llmcompressor


def oneshot_script():
    spec = importlib.util.spec_from_file_location("llmcompressor_oneshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def safetensors_dtypes(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in sorted(f.keys())}


@pytest.mark.parametrize("scheme, fmt, packed, min_cos", [("W4A16", "pack-quantized", "weight_packed", 0.85),
                                                          ("W4A4", "int-quantized", "weight", 0.7),
                                                          ("W8A8", "int-quantized", "weight", 0.99)])
def test_llmcompressor_oneshot_writes_a_reloadable_int_model(export_dir, tmp_path, scheme, fmt, packed,
                                                             min_cos, capsys):
    pytest.importorskip("llmcompressor")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / scheme
    oneshot_script().main([str(export_dir), str(out), "--scheme", scheme, "--group-size", "32",
                           "--samples", "8", "--seq-len", "32", "--max-new-tokens", "5",
                           "--prompt", "w3 w4 w5"])
    printed = capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    assert config["ignore"] == ["lm_head"]
    activations = config["config_groups"]["group_0"]["input_activations"]
    assert (activations or {}).get("num_bits") == {"W4A16": None, "W4A4": 4, "W8A8": 8}[scheme]

    dtypes = safetensors_dtypes(out)
    name = f"model.layers.0.mlp.down_proj.{packed}"
    if scheme == "W4A16":  # eight int4 values per int32
        assert dtypes[name] == "I32" and "model.layers.0.mlp.down_proj.weight" not in dtypes
    else:  # one value per int8
        assert dtypes[name] == "I8"
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            w = f.get_tensor(name).int()  # int8 tensors compared with 128 would wrap
        bound = 8 if scheme == "W4A4" else 128
        assert w.min() >= -bound and w.max() < bound and len(w.unique()) > bound
    assert dtypes["lm_head.weight"] == "F32"  # the ignored head stays as exported
    match = re.search(r"greedy \[([\d, ]+)\]", printed)
    assert match and len(match.group(1).split(",")) == 5

    # The reloaded model computes nearly what the export does: int weights move the logits, not scramble them.
    ids = torch.randint(0, 87, (2, 24), generator=torch.Generator().manual_seed(0))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(export_dir)).eval()(ids).logits
        got = reloaded(ids).logits
        assert not torch.equal(ref, got)
        cos = torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1)).min().item()
        assert cos > min_cos, cos
        # W4A4/W8A8 quantize each Linear's input on the fly at inference; W4A16 does not.
        linear = reloaded.model.layers[0].mlp.down_proj  # its weight is dequantized by the forward above
        x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(1))
        gap = (linear(x) - torch.nn.functional.linear(x, linear.weight)).abs().max().item()
    assert (gap > 1e-3) == (scheme != "W4A16"), gap
