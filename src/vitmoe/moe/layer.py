"""MoEMlp: a drop-in replacement for the ViT MLP whose hidden layer is a set of routed experts.

Router (who goes where), dispatch (sorting copies by expert) and experts (the grouped matmul)
are separate pieces, so switch, top-k and random routing differ only in the router.
Legend in vitmoe.moe.routers.base.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .dispatch import combine, dispatch, expert_capacity
from .experts import GroupedExperts
from .parallel import expert_parallel_apply
from .routers import ROUTERS

EVAL_MODES = ("merged", "random", "ensemble")


class MoEMlp(nn.Module):
    """`[B, N, D] -> [B, N, D]`, with the dense Mlp's constructor contract.

    Capacity factors of None or 0 mean dropless. A copy over capacity gives zero output (the
    block's residual carries the token) and is counted in `stats["dropped_frac"]`.
    `eval_mode` applies only to routers without a learned distribution (random routing):
    "merged" runs the uniform average of the experts (dense cost), "random" keeps drawing
    routes, "ensemble" averages all experts' outputs.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        *,
        num_experts: int = 4,
        router: str = "switch",
        top_k: int = 1,
        capacity_factor_train: float | None = None,
        capacity_factor_eval: float | None = None,
        min_capacity: int = 0,
        expert_init: str = "shared",
        eval_mode: str = "merged",
        random_granularity: str = "batch",
        router_noise: str = "none",
        jitter_eps: float = 0.01,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        dispatch: str = "auto",
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {router!r}")
        if router == "switch" and top_k != 1:
            raise ValueError(f"router 'switch' is top-1; use router='topk' for top_k={top_k}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        for name, cf in (("capacity_factor_train", capacity_factor_train), ("capacity_factor_eval", capacity_factor_eval)):
            if cf is not None and cf < 0:
                raise ValueError(f"{name} must be >= 0 (0 or None: dropless), got {cf}")
        router_kwargs = dict(top_k=top_k)
        if router == "random":
            router_kwargs["granularity"] = random_granularity
        else:
            router_kwargs.update(noise=router_noise, jitter_eps=jitter_eps,
                                 balance_loss_weight=balance_loss_weight, z_loss_weight=z_loss_weight)
        self.router = ROUTERS[router](in_features, num_experts, **router_kwargs)
        self.experts = GroupedExperts(num_experts, in_features, hidden_features, out_features,
                                      act_layer, drop, init=expert_init, dispatch_path=dispatch)
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor_train, self.capacity_factor_eval = capacity_factor_train, capacity_factor_eval
        self.min_capacity, self.eval_mode = min_capacity, eval_mode
        self.aux: dict[str, Tensor] = {}
        """Unweighted auxiliary terms of the last forward (weights in `router.aux_weights`)."""
        self.stats: dict[str, Tensor] = {}
        """Detached statistics of the last forward: load [E], dropped_frac, entropy."""
        self.ep = None
        """Set by vitmoe.moe.parallel.shard_experts when experts are split over ranks."""
        self.register_buffer("usage", torch.zeros(num_experts), persistent=False)
        """Token copies routed to each expert since the last reset (for usage-weighted merging)."""

    @property
    def merges_at_eval(self) -> bool:
        return not self.router.has_distribution and not self.training and self.eval_mode == "merged"

    def capacity(self, tokens: int) -> int | None:
        factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        return expert_capacity(tokens, self.top_k, self.num_experts, factor, self.min_capacity)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        x_TD = x_BND.reshape(B * N, D)
        if not self.training and not self.router.has_distribution and self.eval_mode != "random":
            self.aux, self.stats = {}, {}
            if self.eval_mode == "merged":
                y_TO = self.experts.forward_merged(x_TD)
            else:
                y_TO = self.experts.forward_all(x_TD).mean(0)
            return y_TO.view(B, N, -1)

        routing = self.router(x_BND)
        self.aux = routing.aux or {}
        sharded = self.ep is not None and self.ep.size > 1
        if routing.single_expert is not None and not sharded:
            y_TO = self.experts.forward_single(x_TD, routing.single_expert)
            load_E = torch.zeros(self.num_experts, device=x_TD.device).index_fill_(0, routing.single_expert.view(1), float(B * N))
            self._record(load_E, torch.zeros((), device=x_TD.device), routing.probs_TE)
            return y_TO.view(B, N, -1)

        capacity = self.capacity(B * N)
        d = dispatch(routing.gates_TK, routing.experts_TK, self.num_experts, capacity)
        if sharded:
            y_SO = expert_parallel_apply(self.experts, x_TD[d.token_S], d, self.ep, capacity)
        else:
            y_SO = self.experts(x_TD[d.token_S], d.kept_E, d.expert_S, capacity)
        y_TO = combine(y_SO, d, B * N)
        self._record(d.load_E, d.dropped.float() / d.gate_S.numel(), routing.probs_TE)
        return y_TO.view(B, N, -1)

    @torch.no_grad()
    def _record(self, load_E: Tensor, dropped_frac: Tensor, probs_TE: Tensor | None) -> None:
        # Device tensors only: reading them (and so syncing) is the trainer's choice.
        self.stats = {"load": load_E.detach(), "dropped_frac": dropped_frac.detach()}
        if probs_TE is not None:
            self.stats["entropy"] = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1).mean()
        if self.training:
            self.usage += load_E

    def weighted_aux_loss(self) -> Tensor | None:
        terms = [self.router.aux_weights[k] * v for k, v in self.aux.items() if self.router.aux_weights.get(k)]
        return torch.stack(terms).sum() if terms else None

    def extra_repr(self) -> str:
        return (f"capacity_factor_train={self.capacity_factor_train}, "
                f"capacity_factor_eval={self.capacity_factor_eval}, eval_mode={self.eval_mode}")
