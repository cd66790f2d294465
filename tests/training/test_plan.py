"""`osp plan`: its memory estimate against torch's own accounting of real CPU training steps, and its
arithmetic (FLOPs, tokens, time, sharding) against hand computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from osp.conf import compose
from osp.hardware import GPUS
from osp.model import Transformer
from osp.optim import OptimConfig
from osp.plan import make_plan, measure_activations
from osp.training.module import next_token_loss
from osp.training.parallel import apply_activation_checkpointing
from osp.training.run import build_model_config

HUNDRED_M = ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.ffn_hidden=2048",
             "data.vocab_size=8192", "data.batch_size=2", "data.seq_len=256"]


def measured_peak(cfg) -> int:
    """Peak bytes torch's MemTracker sees in the second real training step of `cfg`'s model on the CPU
    (the first creates the optimizer states), with the loss and optimizer osp trains with."""
    model = Transformer(build_model_config(cfg, int(cfg.data.vocab_size)))
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    optimizer = OptimConfig.from_dict(cfg.optim).build(model)
    batch = torch.randint(0, int(cfg.data.vocab_size), (int(cfg.data.batch_size), int(cfg.data.seq_len) + 1))

    def step() -> None:
        next_token_loss(model(batch[:, :-1]), batch[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    [],  # the default tiny model, AdamW
    ["optim=muon", "activation_checkpointing=true"],
    ["recipe=osp", "data.batch_size=4"],  # Muon + SSNorm + EmbProj
    ["model.attn_gate=headwise", "optim=root"],
    HUNDRED_M,
], ids=["tiny-adamw", "tiny-muon-checkpointed", "tiny-osp", "tiny-gated-root", "100m-adamw"])
def test_memory_estimate_matches_torch_within_15_percent(overrides, one_thread):
    cfg = compose(["trainer.precision=32-true", *overrides])
    plan = make_plan(cfg, gpu="h100", gpus_per_node=1, device_type="cpu")
    measured = measured_peak(cfg)
    assert plan.world_size == 1 and plan.precision == "32-true"
    assert abs(plan.peak_bytes - measured) <= 0.15 * measured, (plan.peak_bytes, measured)


def test_saved_activations_equal_an_independent_count():
    """A 1-layer model's saved tensors, counted by hand from the block's operations (fp32, d=64, ffn=128)."""
    cfg = compose(["model.d_model=64", "model.n_layers=1", "model.n_heads=2", "model.ffn_hidden=128",
                   "data.vocab_size=300", "data.seq_len=16"])
    with torch.device("meta"):
        model = Transformer(build_model_config(cfg, 300))
    b, t, d, f, v = 2, 16, 64, 128, 300
    acts = measure_activations(model, b, t)
    assert acts.block_inputs == [b * t * d * 4]
    # Checkpointing keeps each block's input instead of its insides, and recomputes one block.
    assert acts.checkpointed == acts.outside + b * t * d * 4 + acts.blocks[0]
    # Outside the blocks: at least the fp32 logits' log-softmax (b t v) is saved for the loss.
    assert acts.outside >= b * t * v * 4
    # Inside: at least q, k, v, attention output + lse, and the FFN's gate, up and hidden (b t f each).
    assert acts.blocks[0] >= (4 * b * t * d + b * 2 * t + 3 * b * t * f) * 4


def test_sharding_time_and_budget_arithmetic():
    cfg = compose(["recipe=osp_1p4b", "trainer=fsdp", "trainer.num_nodes=4"])
    one = make_plan(compose(["recipe=osp_1p4b", "trainer=fsdp", "trainer.num_nodes=1"]), "h100", 1)
    plan = make_plan(cfg, "h100", gpus_per_node=8, mfu=0.5)
    assert plan.world_size == 32 and plan.strategy == "fsdp2" and plan.precision == "bf16-mixed"
    assert plan.parameters == one.parameters > 1.3e9
    # FSDP2 divides what is stored by the world size; activations are per device and do not change.
    assert plan.parameter_bytes == pytest.approx(one.parameter_bytes / 32, abs=1)
    assert plan.optimizer_bytes == pytest.approx(one.optimizer_bytes / 32, abs=1)
    assert plan.activation_bytes == one.activation_bytes
    tokens = 4 * 2048 * 8 * 32  # micro-batch x seq_len x accumulation x world
    assert plan.tokens_per_step == tokens
    step = plan.flops_per_token * tokens / (32 * GPUS["h100"].peak_bf16_flops * 0.5)
    assert plan.step_seconds == pytest.approx(step)
    assert plan.days == pytest.approx(476_837 * step / 86400)
    assert plan.token_budget == 476_837 * tokens


@pytest.mark.slow
def test_adam_1p4b_on_one_gpu_does_not_fit_and_says_so():
    out = subprocess.run([sys.executable, "-m", "osp", "plan", "recipe=adam_1p4b", "--gpus-per-node", "1",
                          "--gpu", "a100-40gb"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "WARNING: does not fit" in out.stdout and "trainer=fsdp" in out.stdout


@pytest.mark.slow
def test_json_output_and_one_line_errors():
    out = subprocess.run([sys.executable, "-m", "osp", "plan", "--json", "--gpus-per-node", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["fits"] and plan["world_size"] == 1 and plan["parameters"] > 5e6
    bad = subprocess.run([sys.executable, "-m", "osp", "plan", "model.d_model=abc"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("osp plan: error:") and "d_model" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
