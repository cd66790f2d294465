"""`osp plan`: what a training config costs on a GPU cluster, before any GPU is asked for.

    osp plan recipe=osp_1p4b trainer=fsdp trainer.num_nodes=4 --gpus-per-node 8 --gpu h100

The model is built on the meta device (no memory, no compute) and a forward pass records every tensor
autograd saves for backward, block by block, so the activation count follows the configured blocks
(gated attention, EmbProj, SSNorm, ...) rather than a textbook formula. Attention is counted as the GPU
kernels store it (flash-style SDPA and osp's clipped-attention kernel keep q, k, v, the output and the
log-sum-exp; never the T x T scores). Per device:

- parameters, gradients and optimizer states (AdamW: two moments; Muon/ROOT: one momentum; fp32 master
  weights under mixed precision), divided by the world size under FSDP2;
- activations at the configured micro-batch and sequence length, with and without activation
  checkpointing (checkpointed: what stays outside the blocks, each block's input, one block recomputed);
- transient buffers: the loss's fp32 logit gradients at the start of backward, FSDP2's gathered blocks
  (two) and root unit (embedding, head), the optimizer step's scratch;
- peak = the larger of (backward) parameters + optimizer states + activations + loss gradients
  [+ gradients when accumulating] (checkpointed: stored activations + the larger of the loss gradients and
  one recomputed block) and (optimizer step) parameters + gradients + optimizer states + scratch.

tests/training/test_plan.py checks the estimate against torch's MemTracker on real CPU training steps
(a tiny and a 100M-class model, within 15%). Step time assumes a stated MFU of the GPU's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from omegaconf import DictConfig

from osp.errors import ConfigError
from osp.hardware import GPUS, GiB
from osp.model import ModelConfig, Transformer

# trainer.precision -> (bytes of stored parameters/gradients/optimizer states, dtype of activations)
PRECISIONS = {
    "auto": (4, torch.bfloat16),  # a GPU with native bf16 resolves "auto" to bf16-mixed
    "bf16-mixed": (4, torch.bfloat16),
    "16-mixed": (4, torch.float16),
    "32-true": (4, torch.float32),
    "bf16-true": (2, torch.bfloat16),
    "16-true": (2, torch.float16),
}
STATES_PER_PARAM = {"adamw": 2, "muon": 1, "root": 1}  # optimizer state tensors per parameter, by algorithm


class _SavedLikeFlash(torch.autograd.Function):
    """Stands in for attention on the meta device with the memory of the GPU kernels: it saves q, k, v,
    the output and an fp32 log-sum-exp per query (meta SDPA would pick the math path and save T x T)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _flash_attention_on_meta():
    from osp.model import attention

    def sdpa(q, k, v, *args, **kwargs):  # noqa: ANN001, ANN202 - the torch signature
        return _SavedLikeFlash.apply(q, k, v)

    def clipped(q, k, v, gamma, zeta):  # noqa: ANN001, ANN202
        return _SavedLikeFlash.apply(q, k, v)

    with mock.patch.object(attention.F, "scaled_dot_product_attention", sdpa), \
            mock.patch.object(attention, "clipped_attention", clipped):
        yield


@dataclass
class Activations:
    """Bytes autograd saves in one forward of one micro-batch (one device)."""

    outside: int  # embedding, final norm, head, loss
    blocks: list[int]  # saved inside each block
    block_inputs: list[int]  # each block's input (what a checkpointed block keeps)

    @property
    def full(self) -> int:
        return self.outside + sum(self.blocks)

    @property
    def checkpointed(self) -> int:
        return self.outside + sum(self.block_inputs) + max(self.blocks, default=0)


def measure_activations(model: Transformer, batch: int, seq_len: int) -> Activations:
    """Saved-for-backward bytes of a forward + loss of `model` (on the meta device) at (batch, seq_len).

    Tensors are counted once per storage (views and re-saves of one tensor are one), parameters never."""
    from osp.training.module import next_token_loss

    owned = {id(t) for t in (*model.parameters(), *model.buffers())}
    counted: dict[int, tuple[str, int]] = {}
    alive: list[torch.Tensor] = []  # keeps counted tensors alive, so that their ids stay unique
    where = ["outside"]
    inputs: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t
        while base._base is not None:
            base = base._base
        if id(base) not in owned and id(base) not in counted:
            counted[id(base)] = (where[0], base.numel() * base.element_size())
            alive.append(base)
        return t

    handles = []
    for i, block in enumerate(model.layers):
        def enter(module, args, i=i):  # noqa: ANN001, ANN202
            where[0] = f"block{i}"
            inputs.append(args[0].numel() * args[0].element_size())

        handles.append(block.register_forward_pre_hook(enter))
        handles.append(block.register_forward_hook(lambda module, args, out: where.__setitem__(0, "outside")))
    ids = torch.zeros(batch, seq_len + 1, dtype=torch.long, device="meta")
    try:
        with _flash_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            next_token_loss(model(ids[:, :-1]), ids[:, 1:])
    finally:
        for h in handles:
            h.remove()
    per_place: dict[str, int] = {}
    for place, nbytes in counted.values():
        per_place[place] = per_place.get(place, 0) + nbytes
    blocks = [per_place.get(f"block{i}", 0) for i in range(len(model.layers))]
    return Activations(per_place.get("outside", 0), blocks, inputs)


@dataclass
class Plan:
    """Everything `osp plan` prints; bytes are per device."""

    gpu: str
    world_size: int
    strategy: str
    precision: str
    parameters: int
    non_embedding_parameters: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activation_bytes_checkpointed: int
    activation_checkpointing: bool
    loss_gradient_bytes: int
    sharding_buffer_bytes: int
    step_scratch_bytes: int
    peak_bytes: int
    peak_bytes_other_checkpointing: int
    device_memory_bytes: int
    flops_per_token: float
    tokens_per_step: int
    mfu: float
    step_seconds: float
    tokens_per_second: float
    token_budget: int
    days: float
    notes: list[str]

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= 0.9 * self.device_memory_bytes  # CUDA context, allocator fragmentation


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _strategy(cfg: DictConfig) -> str:
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "FSDP2Strategy" in target:
        return "fsdp2"
    return "ddp" if "DDP" in target or "ddp" in target else "auto"


def vocab_size_of(cfg: DictConfig, notes: list[str]) -> int:
    """The model's vocabulary: the BPE size, or the pretrained tokenizer's (local cache, else
    data.vocab_size)."""
    spec = cfg.data.get("tokenizer", "bpe")
    if spec == "bpe":
        return int(cfg.data.vocab_size)
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache (or not loadable offline): fall back
        notes.append(f"tokenizer {spec} is not in the local cache: "
                     f"using data.vocab_size={cfg.data.vocab_size}")
        return int(cfg.data.vocab_size)


def make_plan(cfg: DictConfig, gpu: str = "h100", gpus_per_node: int = 8, mfu: float = 0.4,
              vocab_size: int | None = None, device_type: str = "cuda") -> Plan:
    """The plan of train config `cfg` (composed, e.g. by `osp.conf.compose`) on `gpu` nodes.

    device_type "cpu" models the CPU's optimizer step (torch's AdamW runs per tensor there), for the test
    that checks the estimate against real CPU steps."""
    from osp.optim import OptimConfig
    from osp.training.run import build_model_config

    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r} is not known; choose one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    notes: list[str] = []
    precision = str(cfg.trainer.get("precision", "auto"))
    strategy = _strategy(cfg)
    fsdp = cfg.trainer.get("strategy") if strategy == "fsdp2" else None
    if fsdp is not None and fsdp.get("param_dtype") in ("bf16", "fp16"):
        precision = "bf16-mixed" if fsdp.get("param_dtype") == "bf16" else "16-mixed"  # FSDP2's policy casts
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    stored_bytes, compute_dtype = PRECISIONS[precision]
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be a positive integer, got {gpus_per_node}")
    devices, nodes = (_int_or(cfg.trainer.get("devices"), gpus_per_node),
                      _int_or(cfg.trainer.get("num_nodes"), 1))
    world = nodes * devices
    batch, seq_len = int(cfg.data.batch_size), int(cfg.data.seq_len)
    accumulate = _int_or(cfg.trainer.get("accumulate_grad_batches"), 1)
    for key, value in (("trainer.devices", devices), ("trainer.num_nodes", nodes),
                       ("data.batch_size", batch), ("data.seq_len", seq_len),
                       ("trainer.accumulate_grad_batches", accumulate)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    model_cfg: ModelConfig = build_model_config(cfg, vocab_size or vocab_size_of(cfg, notes))
    with torch.device("meta"):
        model = Transformer(model_cfg)
    n_params = model.num_params()
    numels: dict[str, list[int]] = {}  # parameter sizes by the algorithm that updates them
    for group in OptimConfig.from_dict(cfg.optim).param_groups(model):
        numels.setdefault(group["algorithm"], []).extend(p.numel() for p in group["params"])
    optimizer_states = sum(STATES_PER_PARAM[algorithm] * sum(sizes) for algorithm, sizes in numels.items())
    adam_numels = numels.get("adamw", [])
    # Muon/ROOT orthogonalize whole matrices (gathered under FSDP2): scratch of the largest one
    matrix_numel = max((n for algorithm, sizes in numels.items() if algorithm != "adamw" for n in sizes),
                       default=0)
    flops_per_token = model.flops_per_token(seq_len)
    activations = measure_activations(model.to(compute_dtype), batch, seq_len)

    shards = world if strategy == "fsdp2" else 1
    params_b = math.ceil(n_params * stored_bytes / shards)
    grads_b = params_b
    optim_b = math.ceil(optimizer_states * stored_bytes / shards)
    loss_b = 2 * batch * seq_len * model_cfg.vocab_size * 4  # fp32 d(log-softmax) and d(logits)
    extra_act = 0
    if strategy != "fsdp2" and precision.endswith("-mixed"):
        # autocast keeps a 16-bit copy of every matmul weight for backward
        extra_act = sum(p.numel() for p in model.parameters() if p.ndim == 2) * 2
        if model_cfg.tie_embeddings:
            extra_act -= model.embed_tokens.weight.numel() * 2
    shard_b = 0
    if strategy == "fsdp2" and world > 1:
        block_sizes = [sum(p.numel() for p in block.parameters()) for block in model.layers]
        rest = n_params - sum(block_sizes)  # embedding, head, final norm: the root unit, gathered whole
        # two gathered blocks in the compute dtype (current + prefetched), one unsharded block gradient
        shard_b = (2 * max(block_sizes) + rest) * compute_dtype.itemsize + max(block_sizes) * 4
    # Adam's step temporaries: a whole group's worth where it runs foreach (osp's Adam inside Muon/ROOT
    # always; torch.optim.AdamW on CUDA), else one tensor's. Newton-Schulz: a few copies of the largest
    # matrix.
    foreach = device_type == "cuda" or cfg.optim.get("name") != "adamw"
    adam_scratch = sum(adam_numels) if foreach else max(adam_numels, default=0)
    scratch_b = math.ceil(adam_scratch * stored_bytes / shards) + 4 * matrix_numel * 4
    checkpointing = bool(cfg.get("activation_checkpointing", False))

    def peak(checkpointed: bool) -> int:
        # Checkpointed, the recomputed block comes after the loss gradients are freed: the larger counts.
        if checkpointed:
            stored = activations.outside + sum(activations.block_inputs)
            transient = max(loss_b, max(activations.blocks, default=0))
        else:
            stored, transient = activations.full, loss_b
        backward = params_b + optim_b + stored + extra_act + transient + shard_b
        backward += grads_b if accumulate > 1 else 0
        step = params_b + grads_b + optim_b + scratch_b
        return max(backward, step)

    act_b, act_ckpt_b = activations.full, activations.checkpointed
    tokens_per_step = batch * seq_len * accumulate * world
    peak_flops = GPUS[gpu].peak_bf16_flops
    step_seconds = flops_per_token * tokens_per_step / (world * peak_flops * mfu)
    max_steps = _int_or(cfg.trainer.get("max_steps"), 0)
    tokens_per_second = tokens_per_step / step_seconds
    if strategy == "auto" and world > 1:
        notes.append(f"trainer.devices={devices}: Lightning runs DDP over them")
    return Plan(
        gpu=gpu, world_size=world, strategy=strategy if world > 1 or strategy == "fsdp2" else "single device",
        precision=precision, parameters=n_params,
        non_embedding_parameters=model.num_params(exclude_embedding=True),
        parameter_bytes=params_b, gradient_bytes=grads_b, optimizer_bytes=optim_b,
        activation_bytes=act_b + extra_act, activation_bytes_checkpointed=act_ckpt_b + extra_act,
        activation_checkpointing=checkpointing, loss_gradient_bytes=loss_b, sharding_buffer_bytes=shard_b,
        step_scratch_bytes=scratch_b,
        peak_bytes=peak(checkpointing), peak_bytes_other_checkpointing=peak(not checkpointing),
        device_memory_bytes=GPUS[gpu].memory_bytes, flops_per_token=flops_per_token,
        tokens_per_step=tokens_per_step, mfu=mfu, step_seconds=step_seconds,
        tokens_per_second=tokens_per_second, token_budget=max_steps * tokens_per_step,
        days=max_steps * step_seconds / 86400, notes=notes)


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def format_plan(p: Plan, cfg: DictConfig) -> str:
    other = "without" if p.activation_checkpointing else "with"
    gpu = GPUS[p.gpu]
    lines = [
        f"plan: {cfg.get('name', 'run')} on {p.world_size} x {gpu.name} ({p.strategy}, {p.precision})",
        f"  parameters          {p.parameters:>16,}   ({p.non_embedding_parameters:,} without the embedding)",
        f"  micro-batch         {cfg.data.batch_size} x {cfg.data.seq_len} tokens per device; "
        f"{p.tokens_per_step:,} tokens per optimizer step",
        "  memory per device",
        f"    parameters        {_gib(p.parameter_bytes):>16}",
        f"    gradients         {_gib(p.gradient_bytes):>16}",
        f"    optimizer states  {_gib(p.optimizer_bytes):>16}",
        f"    activations       {_gib(p.activation_bytes):>16}   without activation checkpointing",
        f"                      {_gib(p.activation_bytes_checkpointed):>16}   with activation checkpointing",
        f"    loss gradients    {_gib(p.loss_gradient_bytes):>16}",
    ]
    if p.sharding_buffer_bytes:
        lines.append(f"    FSDP2 buffers     {_gib(p.sharding_buffer_bytes):>16}")
    lines += [
        f"    optimizer scratch {_gib(p.step_scratch_bytes):>16}",
        f"    peak              {_gib(p.peak_bytes):>16}   of {_gib(p.device_memory_bytes)}"
        f" (activation_checkpointing={str(p.activation_checkpointing).lower()}; "
        f"{other} it: {_gib(p.peak_bytes_other_checkpointing)})",
        f"  compute             {p.flops_per_token / 1e9:,.2f} GFLOP per token (6N + 12 L T d)",
        f"  at {p.mfu:.0%} MFU of {gpu.peak_bf16_flops / 1e12:,.0f} TFLOP/s: "
        f"{p.step_seconds:,.2f} s per step, {p.tokens_per_second:,.0f} tokens/s",
    ]
    if p.token_budget:
        lines.append(f"  budget              {p.token_budget / 1e9:,.1f}B tokens "
                     f"(trainer.max_steps={cfg.trainer.max_steps:,}): {p.days:,.1f} days")
    lines += [f"  note: {n}" for n in p.notes]
    if not p.fits:
        hint = ("activation_checkpointing=true, " if not p.activation_checkpointing
                and p.peak_bytes_other_checkpointing <= 0.9 * p.device_memory_bytes else "")
        lines.append(f"  WARNING: does not fit: peak {_gib(p.peak_bytes)} > 90% of "
                     f"{_gib(p.device_memory_bytes)}; try {hint}a smaller data.batch_size "
                     "(with more trainer.accumulate_grad_batches), or trainer=fsdp on more GPUs")
    return "\n".join(lines)
