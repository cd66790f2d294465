"""`osp bench quant` runs and prints its table; the QuantEval callback config instantiates."""

from __future__ import annotations

from hydra.utils import instantiate

from osp.bench.quant import main as bench_main
from osp.conf import compose
from osp.training.callbacks.quant_eval import QuantEval


def test_bench_prints_a_table(capsys):
    bench_main(
        ["--device", "cpu", "--d-model", "64", "--layers", "1", "--heads", "1", "--vocab", "64",
         "--seq-len", "16", "--blocks", "2", "--batch-size", "2", "--repeats", "1", "--presets", "w4a4kv4",
         "w4a16", "--ffn-hidden", "128"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "view" in out and "w4a4kv4" in out and "w4a16" in out and "tokens/s" in out
    # The down_proj rotation's cost against the layer's matmul (what the outlier-safe FFN saves at inference).
    assert "32 tokens x 128 in -> 64 out" in out and "the Hadamard adds" in out
    assert "Hadamard + quantize input" in out and "matmul (the layer)" in out


def test_callback_config_instantiates():
    node = compose([], config_name="callbacks/quant_eval").callbacks
    callback = instantiate(node)
    assert isinstance(callback, QuantEval) and list(callback.presets) == ["w4a4"]
