"""Evaluation: a model run forward without training.

* `precision`: the autocast region of an `amp` mode (shared with the training step).
* `evaluate`: test loss and accuracy over a loader, summed on the device and reduced over ranks.
* `prepare`: a saved model and the test loader it is evaluated on, as `vitmoe eval` reads them
  (the run's dataset, normalisation and folder options from its checkpoint and config.yaml).
"""
from .evaluate import evaluate
from .precision import autocast_context

__all__ = ["evaluate", "autocast_context"]
