"""Vision Transformer models, presets, merging and accounting."""
from ..validation import ConfigError
from .config import ViTConfig
from .hf import export_hf, load_pretrained
from .info import ModelInfo, model_info
from .io import ModelFileError, load_model, read_metadata, save_model
from .merge import merge_experts
from .mlp import Mlp
from .registry import create_model, describe_models, list_models, model_config, register_model
from .twin import dense_twin, twin_overrides
from .upcycle import upcycle, upcycled_config
from .vit import Attention, Block, ModelOutput, PatchEmbed, VisionTransformer

__all__ = [
    "ViTConfig", "ConfigError", "VisionTransformer", "Block", "Attention", "PatchEmbed", "Mlp", "ModelOutput",
    "create_model", "list_models", "describe_models", "model_config", "register_model",
    "merge_experts", "model_info", "ModelInfo", "save_model", "load_model", "read_metadata", "ModelFileError",
    "load_pretrained", "export_hf",
    "upcycle", "upcycled_config", "dense_twin", "twin_overrides",
]
