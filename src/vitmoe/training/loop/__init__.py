"""The training loop: a Trainer that runs a RunSpec epoch by epoch, carrying a TrainState
(checkpoints.state).

* `trainer`: Trainer (setup, the epoch loop, evaluation, checkpoint, metrics row) and `train`.
* `step`: one optimizer step (forward with the losses, backward, clip, optimizer and lr step; one
  path for fp32/bf16/fp16); `losses`: soft-target cross-entropy, symmetric KL.
* `meters`: device-side epoch sums (no host sync in the loop).
* `optim`: the optimizer; `schedule`: the lr factor, its cycles after a resume, LRSchedule.
* `budget`: the training-time budget; `progress`: the tqdm bar and TensorBoard.
* `loaders`: the run's loaders from its RunSpec; `summary`: summary.json and the run's first log line.
"""
