"""The dense twin of an MoE model: the same network with dense MLPs whose hidden width gives the
same forward FLOPs per image as the MoE's experts do (k experts per token of width H: a dense MLP
of width k*H), so that "does the MoE pay?" compares two models of equal compute. The routing
itself is left out of the match on purpose: it is part of what the MoE pays (a few per mille of
the FLOPs, and whatever it costs in time), and leaving it out gives MoEs that differ only in their
expert count or router one twin to share."""
from __future__ import annotations

from .config import ViTConfig
from .info import model_info


def dense_twin(cfg: ViTConfig) -> ViTConfig:
    """`cfg` without MoE layers, its `mlp_hidden` chosen so that its forward FLOPs per image are the
    nearest to `cfg`'s without the routing (`ModelInfo.routing_flops_per_image`); a dense `cfg` comes
    back unchanged. Every other field is `cfg`'s own."""
    cfg = cfg.validate()
    if not cfg.is_moe:
        return cfg
    info = model_info(cfg)
    target = info.forward_flops_per_image - info.routing_flops_per_image
    dense = cfg.replace(moe_layers="none", num_experts=1, moe={"residual": False})
    # A dense model's FLOPs are affine in its MLP width: two evaluations give the whole line.
    f1 = model_info(dense.replace(mlp_hidden=1)).forward_flops_per_image
    f2 = model_info(dense.replace(mlp_hidden=2)).forward_flops_per_image
    hidden = max(1, round(1 + (target - f1) / (f2 - f1)))
    return dense.replace(mlp_hidden=hidden).validate()


def twin_overrides(cfg: ViTConfig) -> dict[str, object]:
    """The model overrides that turn `cfg` into its dense twin (as `--set model.FIELD=VALUE`)."""
    out: dict[str, object] = {"model.moe_layers": "none", "model.mlp_hidden": dense_twin(cfg).mlp_hidden}
    if isinstance(cfg.num_experts, (list, tuple)):  # one count per MoE block: there are none left
        out["model.num_experts"] = 1
    if cfg.moe.residual:
        out["model.moe.residual"] = "false"
    return out
