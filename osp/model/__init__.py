"""Plain-PyTorch model code (no Lightning imports)."""

from .config import CHOICES, ConfigError, ModelConfig
from .embedding import merge_emb_proj
from .transformer import ROLES, Block, Transformer

__all__ = ["CHOICES", "ConfigError", "ModelConfig", "ROLES", "Block", "Transformer", "merge_emb_proj"]
