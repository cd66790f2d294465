"""Export to Hugging Face folders (plain Llama or osp custom code) and loading back from any osp checkpoint."""

from .hf import export_hf, hf_state_dict
from .layout import LayoutWarning, layout_problems
from .load import CheckpointError, load_model

__all__ = ["CheckpointError", "LayoutWarning", "export_hf", "hf_state_dict", "layout_problems", "load_model"]
