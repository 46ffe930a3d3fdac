"""Evaluation: a model run forward without training.

* `precision`: the autocast region of an `amp` mode (shared with the training step), and what
  "auto" picks on a device.
* `evaluate`: test loss and accuracy over a loader, summed on the device and reduced over ranks.

Preparing a saved run for evaluation (its model, dataset, normalisation and folder options from
its checkpoint and config.yaml) is still `vitmoe.cli.eval.prepare_eval`, which `vitmoe eval` and
`vitmoe analyze` share; it raises the CLI's errors, which is why it has not moved here yet.
"""
from .evaluate import evaluate
from .precision import autocast_context

__all__ = ["evaluate", "autocast_context"]
