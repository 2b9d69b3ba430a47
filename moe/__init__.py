"""moe: a readable, fast PyTorch reference implementation of Mixture-of-Experts transformers."""

from . import io  # noqa: F401  (registers the checkpoint formats of Transformer.save_pretrained / from_*)
from .config import ModelConfig, MoEConfig, config_from_dict, load_config
from .layer import MoE, update_expert_biases
from .model import Transformer, layer_plan
from .router import Router

__all__ = [
    "ModelConfig",
    "MoEConfig",
    "MoE",
    "Router",
    "Transformer",
    "config_from_dict",
    "layer_plan",
    "load_config",
    "update_expert_biases",
]
# The one place the version is written: pyproject.toml reads it from here, `moe --version` from
# the installed distribution's metadata.
__version__ = "0.1.0"
