"""Export to Hugging Face folders (plain Llama or osp custom code) and llama.cpp GGUF files, and loading back
from any osp checkpoint."""

from .gguf import GGUFExportError, export_gguf
from .hf import export_hf, hf_state_dict
from .layout import LayoutWarning, layout_problems
from .load import CheckpointError, load_model

__all__ = ["CheckpointError", "GGUFExportError", "LayoutWarning", "export_gguf", "export_hf", "hf_state_dict",
           "layout_problems", "load_model"]
