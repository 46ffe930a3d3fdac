"""Distribution: who this process is among the ranks, and experts split over them.

* `context`: DistContext (rank, world size, device; reductions and barriers that are no-ops in one
  process), `resolve_device`, `synchronize`, `wrap_ddp`.
* `expert_parallel`: each MoE layer's experts sharded over a group of ranks, their gradients reduced
  over replicas, and whole-model state gathered for checkpoints and sliced back on resume.

Starting the processes is `training.launch`'s (it runs the whole loop in each of them).
"""
from .context import DistContext, resolve_device, synchronize, wrap_ddp

__all__ = ["DistContext", "resolve_device", "synchronize", "wrap_ddp"]
