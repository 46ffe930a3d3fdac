"""MoEMlp: a drop-in replacement for the ViT MLP whose hidden layer is a set of routed experts.

Router (who goes where), dispatch (sorting copies by expert) and experts (the grouped matmul)
are separate pieces, so switch, top-k and random routing differ only in the router.
Legend in vitmoe.moe.routers.base.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base_layer import MoELayer
from .dispatch import combine, dispatch_routing, expert_capacity
from .experts import GroupedExperts
from .parallel import expert_parallel_apply
from .routers import ROUTERS

EVAL_MODES = ("merged", "random", "ensemble")


class MoEMlp(MoELayer):
    """`[B, N, D] -> [B, N, D]`, with the dense Mlp's constructor contract.

    Capacity factors of None or 0 mean dropless. A copy over capacity gives zero output (the
    block's residual carries the token) and is counted in `stats["dropped_frac"]`.
    `eval_mode` applies only to routers without a learned distribution (random routing):
    "merged" runs the uniform average of the experts (dense cost), "random" keeps drawing
    routes, "ensemble" averages all experts' outputs.
    `second_policy` / `second_threshold`: top-2 second-expert policy (TopKRouter).
    Router "expert_choice" needs capacity factors: its capacity is the tokens each expert takes.
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
        second_policy: str = "all",
        second_threshold: float = 0.0,
        dispatch: str = "auto",
    ):
        super().__init__(num_experts)
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
        elif router == "expert_choice":
            router_kwargs.update(noise=router_noise, jitter_eps=jitter_eps, z_loss_weight=z_loss_weight)
        else:
            router_kwargs.update(noise=router_noise, jitter_eps=jitter_eps, balance_loss_weight=balance_loss_weight,
                                 z_loss_weight=z_loss_weight, second_policy=second_policy,
                                 second_threshold=second_threshold)
        self.router = ROUTERS[router](in_features, num_experts, **router_kwargs)
        if self.router.chooses_tokens and not (capacity_factor_train and capacity_factor_eval):
            raise ValueError(f"router {router!r} needs capacity_factor_train and capacity_factor_eval > 0 "
                             f"(got {capacity_factor_train}, {capacity_factor_eval})")
        self.experts = GroupedExperts(num_experts, in_features, hidden_features, out_features,
                                      act_layer, drop, init=expert_init, dispatch_path=dispatch)
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor_train, self.capacity_factor_eval = capacity_factor_train, capacity_factor_eval
        self.min_capacity, self.eval_mode = min_capacity, eval_mode
        self.ep = None
        """Set by vitmoe.moe.parallel.shard_experts when experts are split over ranks."""

    @property
    def aux_weights(self) -> dict[str, float]:
        return self.router.aux_weights

    def capacity(self, tokens: int) -> int | None:
        factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        capacity = expert_capacity(tokens, self.top_k, self.num_experts, factor, self.min_capacity)
        if self.router.chooses_tokens and capacity is not None:
            capacity = min(capacity, tokens)  # an expert cannot take more tokens than there are
        return capacity

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        x_TD = x_BND.reshape(B * N, D)
        if not self.training and not self.router.has_distribution and self.eval_mode != "random":
            self.reset_calls()
            if self.eval_mode == "merged":
                y_TO = self.experts.forward_merged(x_TD)
            else:
                y_TO = self.experts.forward_all(x_TD).mean(0)
            return y_TO.view(B, N, -1)

        capacity = self.capacity(B * N)
        routing = self.router(x_BND, capacity)
        self._record_aux(routing.aux or {})
        sharded = self.ep is not None and self.ep.size > 1
        if routing.single_expert is not None and not sharded:
            y_TO = self.experts.forward_single(x_TD, routing.single_expert)
            load_E = torch.zeros(self.num_experts, device=x_TD.device).index_fill_(0, routing.single_expert.view(1), float(B * N))
            self._record(load_E, torch.zeros((), device=x_TD.device), routing.probs_TE)
            return y_TO.view(B, N, -1)

        d = dispatch_routing(routing, self.num_experts, capacity)
        if sharded:
            y_SO = expert_parallel_apply(self.experts, x_TD.index_select(0, d.token_S), d, self.ep, capacity)
        else:
            y_SO = self.experts(x_TD.index_select(0, d.token_S), d.kept_E, d.expert_S, capacity)
        y_TO = combine(y_SO, d, B * N)
        extra = None
        if routing.copies is not None:  # expert choice: the share of tokens no expert took
            taken_T = torch.zeros(B * N, device=x_TD.device).index_fill_(0, routing.copies.token_S, 1.0)
            extra = {"untouched_frac": 1 - taken_T.mean()}
        self._record(d.load_E, d.dropped.float() / d.load_E.sum().clamp_min(1), routing.probs_TE, extra)
        return y_TO.view(B, N, -1)

    def extra_repr(self) -> str:
        return (f"capacity_factor_train={self.capacity_factor_train}, "
                f"capacity_factor_eval={self.capacity_factor_eval}, eval_mode={self.eval_mode}")
