"""The single-device Llama-style model, its named flavors, and its FLOPs/memory formulas."""

from scaletrain.model.flavors import flavor_names, model_config_for
from scaletrain.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model", "flavor_names", "model_config_for"]
