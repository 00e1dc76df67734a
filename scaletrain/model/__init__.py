"""The single-device Llama-style model and its FLOPs/memory formulas. The named flavors live in
config/flavors.py (config data); `model_config_for` and `flavor_names` are re-exported here."""

from scaletrain.config.flavors import flavor_names, model_config_for
from scaletrain.model.transformer import Transformer, build_model

__all__ = ["Transformer", "build_model", "flavor_names", "model_config_for"]
