"""`compile=true` on CPU: every block variant compiles into one graph, trains without recompiling after the
first step, and matches eager training (osp.bench.compile runs the same steps and also times them)."""

from __future__ import annotations

import pytest
import torch

from osp.bench.compile import RECIPES, train_steps, variant_config

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")]

SIZES = ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=192"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_block_variant_compiles_once_and_trains_like_eager(recipe, one_thread):
    cfg = variant_config(recipe, SIZES, vocab_size=128, seq_len=16)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2, 17), generator=generator) for _ in range(3)]
    eager = train_steps(cfg, batches, compiled=False)
    compiled = train_steps(cfg, batches, compiled=True)  # raises on any recompile after the first step
    assert compiled["graphs"] == compiled["graphs_after_first_step"] == 1
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4, abs=1e-4)


def test_the_variants_are_the_recipes_blocks():
    """Each recipe changes the model it is named for (so the loop above covers every block)."""
    base = variant_config("tiny", SIZES, 128, 16)
    changed = {recipe: {k for k, v in vars(variant_config(recipe, SIZES, 128, 16)).items()
                        if vars(base)[k] != v}
               for recipe in RECIPES if recipe != "tiny"}
    assert changed["ssnorm"] == {"norm"} and changed["embproj"] == {"emb_proj"}
    assert "attn_softmax" in changed["clipped_softmax"] and changed["gated_norm"] == {"gated_norm_rank"}
    assert all(changed.values()), changed
