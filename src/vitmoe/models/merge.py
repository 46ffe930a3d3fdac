"""Merge every MoE MLP of a model into one dense MLP: a plain ViT with the dense parameter count."""
from __future__ import annotations

import warnings

import torch

from ..moe import MoEMlp, find_moe_layers, router_class
from .vit import VisionTransformer

UNMERGEABLE = "residual MoE (moe.residual=True) and routers that declare mergeable=False (Soft MoE)"

WEIGHTINGS = ("uniform", "usage")


@torch.no_grad()
def merge_experts(model: VisionTransformer, weighting: str = "uniform") -> VisionTransformer:
    """A dense VisionTransformer whose MLPs are the (weighted) average of each layer's experts.

    For randomly routed models with uniform weighting, its outputs equal the MoE model's in
    "merged" eval mode. "usage" weights each expert by the token copies it received in
    training since the model was built or loaded (the layer's `usage` buffer). Merging a
    model with a learned router is allowed, with a warning: its experts were trained to
    specialise and their average is a different network.

    WideNet (share_blocks) merges into an unshared plain ViT: every block gets its own copy of
    the shared attention and of the merged MLP (same function, depth times the parameters).
    Residual MoE and Soft MoE are refused: a residual layer is `c0(x) * moe(x) + c1(x) * mlp(x)`
    with per-token mixing, which no single dense MLP equals even with identical experts, and a
    Soft MoE layer's slot mixing is not an MLP either; keep those models as they are.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    cfg = model.config
    if cfg.moe.residual or not router_class(cfg.moe.router).mergeable:
        raise ValueError(f"merge_experts: {UNMERGEABLE} cannot be merged into a plain ViT "
                         f"(this model: moe.residual={cfg.moe.residual}, moe.router={cfg.moe.router!r}); "
                         "evaluate the MoE model itself")
    # Every name of every layer: a WideNet layer appears under each block that uses it.
    moe = {name: m for name, m in find_moe_layers(model, every_name=True) if isinstance(m, MoEMlp)}
    routed = [name for name, m in moe.items() if m.router.has_distribution]
    if routed:
        warnings.warn(
            f"merging {len(routed)} MoE layer(s) with a learned router ({cfg.moe.router}): the average of "
            "specialised experts is not the routed model; expect lower accuracy than the MoE model",
            stacklevel=3,  # past the no_grad wrapper, to the caller
        )
    # Built in the source's dtype and device: loading float64 experts into a float32 model would
    # round them, and the merged model would no longer equal the MoE model's merged evaluation.
    source = next(model.parameters())
    dense = VisionTransformer(cfg.replace(moe_layers="none", num_experts=1, share_blocks=False))
    dense.to(device=source.device, dtype=source.dtype)
    state = {k: v for k, v in model.state_dict().items()}
    for name, m in moe.items():
        weights = None
        if weighting == "usage":
            if float(m.usage.sum()) == 0:
                raise ValueError(f"{name}: no expert usage recorded; train or run the model in train mode first, or use weighting='uniform'")
            weights = m.usage
        w1, b1, w2, b2 = m.experts.merged_weights(weights)
        for key in [k for k in state if k.startswith(name + ".")]:
            del state[key]
        state.update({f"{name}.fc1.weight": w1.t(), f"{name}.fc1.bias": b1,
                      f"{name}.fc2.weight": w2.t(), f"{name}.fc2.bias": b2})
    dense.load_state_dict(state, strict=True)
    return dense.train(model.training)
