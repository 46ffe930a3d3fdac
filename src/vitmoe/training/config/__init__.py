"""Configuration: what a run is, checked and resolved before anything is loaded or started.

* `train_config`: TrainConfig, every training field with its docstring (the `vitmoe train` flags are
  made from them), YAML and overrides, `validate()` (one check, messages naming the field).
* `model`: the run's ViTConfig from the preset, the dataset's shape and the overrides; the run label;
  how model overrides are spelled (nested `moe`, old flat names, the removed aux_loss_weight).
* `data`: the dataset's info, the image side the model sees, the checks of the data fields.
* `recipe`: the checks of the recipe extras (mixing, EMA, consistency, expert averaging, freezing).
* `spec`: `resolve(cfg) -> RunSpec`, the run resolved once (config, model, data, normalisation,
  label), and `load_config` (a TrainConfig from a YAML file plus overrides).
"""
from .recipe import MOE_ONLY_FIELDS
from .spec import RunSpec, default_out, load_config, resolve
from .train_config import TrainConfig, parse_set

__all__ = ["MOE_ONLY_FIELDS", "RunSpec", "TrainConfig", "resolve", "load_config", "default_out", "parse_set"]
