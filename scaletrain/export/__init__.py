"""Hugging Face safetensors import/export."""

from scaletrain.export.hf import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
