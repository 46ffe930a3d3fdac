"""Using a trained model: load it from wherever it lives and classify image files.

* `sources`: what a MODEL argument names (a run directory, checkpoint, `checkpoints/latest`
  pointer, model file or transformers directory), `load_model` of any of them, and what the
  source says about the model's classes and preprocessing.
* `images`: the image files an IMAGES argument names (files, folders, globs).
* `classifier`: `ImageClassifier` (model + preprocessing + class names), `load_classifier`,
  `predict`, `Prediction`.

`vitmoe predict` (cli/predict.py) is these pieces plus output formats.
"""
from .classifier import ImageClassifier, Prediction, load_classifier, predict
from .images import ImageInputError, find_images
from .sources import ModelSource, load_model, resolve_source

__all__ = ["ImageClassifier", "Prediction", "load_classifier", "predict", "ImageInputError", "find_images",
           "ModelSource", "load_model", "resolve_source"]
