"""`osp bench train` at a minuscule size: every loop and every default callback gets a row."""

import math

from osp.bench import training_loops as bench_train
from osp.bench.training_loops import LOOPS, MiniLlama, hf_llama
from osp.model import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, ffn_hidden=96, max_seq_len=16)


def test_reference_models_have_osp_shapes():
    n = sum(p.numel() for p in Transformer(TINY).parameters())
    assert sum(p.numel() for p in MiniLlama(TINY).parameters()) == n
    assert sum(p.numel() for p in hf_llama(TINY).parameters()) == n


def test_bench_train_prints_both_tables(capsys):
    result = bench_train.main(["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--ffn-hidden", "96",
                               "--vocab-size", "128", "--seq-len", "16", "--batch-size", "2", "--steps", "2",
                               "--reps", "2", "--warmup", "1", "--callback-steps", "2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "vs plain" in printed and "% of step" in printed
    for loop in LOOPS:
        assert any(line.startswith(loop + " ") for line in printed.splitlines()), loop
        assert math.isfinite(result["loops"][loop]) and result["loops"][loop] > 0
    assert {name: c["interval"] for name, c in result["callbacks"].items()} == {
        "outliers": 100, "quant_eval": 500, "throughput": 1, "stability": 1}
    assert all(c["seconds_per_call"] > 0 for c in result["callbacks"].values())
