"""The checks of the training-recipe fields that go beyond plain cross-entropy and AdamW: batch
mixing (mixup / CutMix), the weights' EMA, consistency regularisation, periodic expert averaging
and freezing experts that got no tokens. Several of them only mean something for some MoE models
(two passes with different random routes, averaging experts that random routing keeps
interchangeable), so their checks read the resolved model config.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...moe import ROUTERS, router_class
from ...validation import Fields

if TYPE_CHECKING:
    from ...models import ViTConfig
    from .train_config import TrainConfig


def check_recipe_fields(cfg: "TrainConfig", f: Fields) -> None:
    """The model-independent ranges: mixing, EMA, expert averaging, freeze_unrouted, consistency."""
    f.number("mixup_alpha", 0.0)
    f.number("cutmix_alpha", 0.0)
    f.number("mix_prob", 0.0, 1.0)
    f.number("mix_switch_prob", 0.0, 1.0)
    # decay 1 would never move the EMA away from the initial weights.
    f.number("ema_decay", 0.0, 1.0, strict_hi=True)
    f.integer("merge_every", 0)
    f.boolean("freeze_unrouted")
    f.number("consistency_weight", 0.0)
    f.boolean("consistency_stopgrad")


MOE_ONLY_FIELDS = ("consistency_weight", "consistency_stopgrad", "merge_every", "freeze_unrouted", "ep_size",
                   "eval_mode")
"""Training fields that act only on MoE layers (a dense model leaves them at their defaults): they
do not make an MoE run's training different from its dense twin's."""


def check_recipe_model(cfg: "TrainConfig", f: Fields, mc: "ViTConfig") -> None:
    """The fields that need a kind of MoE layer in the resolved model `mc`."""
    moe = bool(mc.moe_block_indices())
    what = "is dense" if not moe else f"routes with router {mc.moe.router!r}"
    router = router_class(mc.moe.router)
    random = moe and router.random_routes
    if cfg.consistency_weight > 0 and not random:
        f.fail("consistency_weight", f"0 for model {cfg.model!r}, which {what}: consistency regularisation "
                                     f"compares two passes with different random routes, so it needs randomly "
                                     f"routed MoE layers (router 'random', e.g. model random_vit or "
                                     f"model.moe.router=random)")
    if cfg.merge_every > 0 and not random:
        f.fail("merge_every", f"0 for model {cfg.model!r}, which {what}: averaging the experts keeps the model's "
                              f"function only when no learned router tells them apart, so it needs randomly routed "
                              f"MoE layers (router 'random', e.g. model random_vit)")
    if cfg.freeze_unrouted and not (moe and router.routes_tokens):
        what = "is dense" if not moe else (f"routes with router {mc.moe.router!r} ({router.describe(mc.moe)}), "
                                           "where every expert gets work in every step")
        routed = ", ".join(name for name, r in ROUTERS.items() if r.routes_tokens)
        f.fail("freeze_unrouted", f"false for model {cfg.model!r}, which {what}: it only acts on routed MoE "
                                  f"layers ({routed})")
