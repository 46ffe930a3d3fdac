"""vitmoe: Vision Transformers with Mixture-of-Experts MLPs."""
from .data.preprocess import Preprocessing
from .inference import ImageClassifier, Prediction, load_classifier, load_model, predict
from .models import (
    ConfigError, ModelOutput, ViTConfig, VisionTransformer, create_model, list_models, merge_experts, model_info,
    save_model, upcycle,
)
from .models import load_pretrained
from .moe import MoEConfig, MoEMlp, SoftMoE, collect_moe_outputs

__version__ = "0.1.0"
__all__ = [
    "MoEConfig", "MoEMlp", "SoftMoE", "collect_moe_outputs", "VisionTransformer", "ViTConfig", "ModelOutput",
    "ConfigError", "create_model", "list_models", "merge_experts", "model_info", "load_model", "save_model",
    "load_pretrained", "load_classifier", "predict", "ImageClassifier", "Prediction", "Preprocessing",
    "upcycle", "__version__",
]
