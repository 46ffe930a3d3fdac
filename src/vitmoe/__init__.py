"""vitmoe: Vision Transformers with Mixture-of-Experts MLPs."""
from .models import (
    ConfigError, ViTConfig, VisionTransformer, create_model, list_models, load_model, merge_experts, model_info, save_model,
)
from .moe import MoEMlp

__version__ = "0.1.0"
__all__ = [
    "MoEMlp", "VisionTransformer", "ViTConfig", "ConfigError", "create_model", "list_models",
    "merge_experts", "model_info", "load_model", "save_model", "__version__",
]
