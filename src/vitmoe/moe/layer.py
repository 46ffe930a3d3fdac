"""MoEMlp: a drop-in replacement for the ViT MLP whose hidden layer is a set of routed experts.

Router (who goes where), dispatch (sorting copies by expert) and experts (the grouped matmul)
are separate pieces, so switch, top-k, random and expert-choice routing differ only in the
router, which the layer builds by name from its MoEConfig. Legend in vitmoe.moe.routers.base.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base_layer import MoELayer
from .config import MoEConfig, resolve_config
from .dispatch import combine, dispatch_routing, expert_capacity
from .experts import GroupedExperts
from .parallel import expert_parallel_apply
from .routers import ROUTERS, router_class


class MoEMlp(MoELayer):
    """`[B, N, D] -> [B, N, D]`, with the dense Mlp's constructor contract.

    Args:
        in_features, hidden_features, out_features, act_layer, drop: as the dense Mlp's.
        num_experts: experts of this layer.
        config: the MoE settings (router, top_k, capacities, noise, loss weights, ...; see
            MoEConfig); keyword arguments override its fields, e.g.
            `MoEMlp(300, 1024, num_experts=8, router="topk", top_k=2)`.

    A copy over capacity gives zero output (the block's residual carries the token) and is
    counted in the `dropped_frac` statistic. In evaluation, a layer whose router has no learned
    distribution (random) follows `eval_mode`: merged, random or ensemble.
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
        config: MoEConfig | None = None,
        **options,
    ):
        config = resolve_config(config, options, num_experts)
        router = router_class(config.router)
        if router.layer is not None:
            own = [name for name, cls in ROUTERS.items() if cls.layer is None]
            raise ValueError(f"MoEMlp routes with one of {own}, got router {config.router!r} "
                             f"(its layer is {router.layer.__name__})")
        super().__init__(num_experts, config)
        self.router = router(in_features, num_experts, config)
        self.experts = GroupedExperts(num_experts, in_features, hidden_features, out_features,
                                      act_layer, drop, init=config.expert_init, dispatch_path=config.dispatch)
        self.top_k = config.top_k

    @property
    def aux_weights(self) -> dict[str, float]:
        return self.router.aux_weights

    def capacity(self, tokens: int, tokens_per_image: int = 1) -> int | None:
        """Slots per expert for a forward of `tokens` tokens: token copies, or whole images for a
        router that routes images (then C = ceil(factor * images * k / E))."""
        cfg = self.config
        factor = cfg.capacity_factor_train if self.training else cfg.capacity_factor_eval
        units = tokens // tokens_per_image if self.router.routes_images else tokens
        capacity = expert_capacity(units, self.top_k, self.num_experts, factor, cfg.min_capacity)
        if self.router.chooses_tokens and capacity is not None:
            capacity = min(capacity, tokens)  # an expert cannot take more tokens than there are
        return capacity

    def forward_bnd(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        x_TD = x_BND.reshape(B * N, D)
        if not self.training and not self.router.has_distribution and self.eval_mode != "random":
            if self.eval_mode == "merged":
                y_TO = self.experts.forward_merged(x_TD)
            else:
                y_TO = self.experts.forward_all(x_TD).mean(0)
            return y_TO.view(B, N, -1)

        capacity = self.capacity(B * N, N)
        routing = self.router(x_BND, capacity)
        sharded = self.experts.sharded
        if routing.single_expert is not None and not sharded:
            y_TO = self.experts.forward_single(x_TD, routing.single_expert)
            load_E = torch.zeros(self.num_experts, device=x_TD.device).index_fill_(
                0, routing.single_expert.view(1), float(B * N))
            record = {"expert_T": routing.single_expert.expand(B * N).clone()} if self.recording else None
            self._report(routing.aux, load_E, torch.zeros((), device=x_TD.device), routing.probs_TE, routing=record)
            return y_TO.view(B, N, -1)

        d = dispatch_routing(routing, self.num_experts, capacity)
        if capacity is not None:
            capacity *= routing.tokens_per_row  # rows of each expert's queue
        if sharded:
            y_SO = expert_parallel_apply(self.experts, x_TD.index_select(0, d.token_S), d, self.experts.ep, capacity)
        else:
            y_SO = self.experts(x_TD.index_select(0, d.token_S), d.kept_E, d.expert_S, capacity)
        y_TO = combine(y_SO, d, B * N)
        extra = None
        if routing.copies is not None:  # expert choice: the share of tokens no expert took
            taken_T = torch.zeros(B * N, device=x_TD.device).index_fill_(0, routing.copies.token_S, 1.0)
            extra = {"untouched_frac": 1 - taken_T.mean()}
        record = self._routing_record(routing, d, B * N) if self.recording else None
        self._report(routing.aux, d.load_E, d.dropped.float() / d.load_E.sum().clamp_min(1), routing.probs_TE, extra,
                     record)
        return y_TO.view(B, N, -1)

    @staticmethod
    def _routing_record(routing, d, tokens: int) -> dict[str, torch.Tensor]:
        """Where each token went: its first choice (-1 if that copy was dropped or not sent);
        for expert choice, the expert with the largest gate and how many experts took it."""
        n_kept = d.kept_E.sum()
        kept_S = torch.arange(d.token_S.numel(), device=d.token_S.device) < n_kept
        if routing.copies is None:
            expert_T = torch.full((tokens,), -1, dtype=torch.int64, device=d.token_S.device)
            # A token's first choice is the copy whose expert equals experts_TK[:, 0] (of its row).
            first_T = routing.experts_TK[:, 0].repeat_interleave(routing.tokens_per_row)
            hit_S = kept_S & (d.expert_S == first_T.index_select(0, d.token_S))
            expert_T.index_put_((d.token_S[hit_S],), d.expert_S[hit_S])
            return {"expert_T": expert_T}
        gate_S = torch.where(kept_S, d.gate_S, torch.full_like(d.gate_S, -1.0))
        best_T = torch.full((tokens,), -1.0, device=gate_S.device).scatter_reduce(0, d.token_S, gate_S, "amax")
        is_best_S = kept_S & (gate_S == best_T.index_select(0, d.token_S))
        expert_T = torch.full((tokens,), -1, dtype=torch.int64, device=gate_S.device)
        expert_T.index_put_((d.token_S[is_best_S],), d.expert_S[is_best_S])
        count_T = torch.zeros(tokens, dtype=torch.int64, device=gate_S.device).index_add_(0, d.token_S, kept_S.long())
        return {"expert_T": expert_T, "experts_per_token_T": count_T}

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"capacity_factor_train={cfg.capacity_factor_train}, "
                f"capacity_factor_eval={cfg.capacity_factor_eval}, eval_mode={self.eval_mode}")
