"""Recipe extras: optional parts of a training recipe beyond cross-entropy and Adam (each off by
default; their checks are config.recipe's; batch mixing is vitmoe.data.mix).

* `ema`: an exponential moving average of the weights, evaluated and saved beside the model.
* `expert_averaging`: randomly routed layers' experts (and their Adam moments) set to their mean
  every `merge_every` steps.
* `freeze`: experts that got no token in a step keep their weights and optimizer moments.
"""
