"""What the experts did: one evaluation pass with the MoE layers recording their routing.

Per MoE layer: the share of each class's tokens each expert took (the V-MoE paper's
specialisation figure, Riquelme et al. 2021), the share of each patch position's tokens,
load balance, router entropy, the dropped fraction at the eval capacity, and dead experts
(a share below `dead_threshold` times the uniform share 1/E). For randomly routed models,
what decides whether merging works: the accuracy of each expert alone, merged, ensembled and
randomly routed, and how far the experts drifted apart (AdaMix, Wang et al. 2022, averages
them for inference; the average is only a good network while they stay close).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from ..moe import MoEMlp, collect_moe_outputs, find_moe_layers
from ..moe.collect import DEAD_THRESHOLD, dead_experts
from ..moe.routers.random import RandomRouter



class RoutingCounts:
    """Token counts of one layer: [classes, E] and [positions, E] (-1 = no expert is not counted)."""

    def __init__(self, classes: int, positions: int, experts: int, device):
        self.by_class = torch.zeros(classes, experts, dtype=torch.int64, device=device)
        self.by_position = torch.zeros(positions, experts, dtype=torch.int64, device=device)
        self.experts = experts
        self.load = torch.zeros(experts, dtype=torch.float64, device=device)
        self.entropy, self.dropped, self.calls = 0.0, 0.0, 0

    def add(self, expert_BN: Tensor, y_B: Tensor, first: int) -> None:
        """`expert_BN`: each token's expert; `first`: tokens before the patches (a class token)."""
        e = expert_BN[:, first:]
        cls = y_B.unsqueeze(1).expand_as(e)
        pos = torch.arange(e.shape[1], device=e.device).unsqueeze(0).expand_as(e)
        self.by_class += cell_counts(cls.reshape(-1), e.reshape(-1), *self.by_class.shape)
        self.by_position += cell_counts(pos.reshape(-1), e.reshape(-1), *self.by_position.shape)


def cell_counts(row: Tensor, expert: Tensor, rows: int, experts: int) -> Tensor:
    """[rows, E] token counts; tokens without an expert (-1) are not counted."""
    ok = expert >= 0
    cell = (row * experts + expert.clamp_min(0))[ok]
    return torch.bincount(cell, minlength=rows * experts).view(rows, experts)


def shares(counts: Tensor) -> Tensor:
    """Rows normalised to sum to 1 (a row without tokens stays 0)."""
    c = counts.double()
    return c / c.sum(-1, keepdim=True).clamp_min(1)


def class_expert_shares(expert_T: Tensor, y_T: Tensor, classes: int, experts: int) -> Tensor:
    """[classes, E]: of each class's routed tokens, the share each expert took (rows sum to 1)."""
    return shares(cell_counts(y_T, expert_T, classes, experts))


@torch.no_grad()
def record_routing(model: nn.Module, loader, classes: int, keep_images: int = 0) -> dict:
    """One eval pass with the routing recorded: per layer counts and statistics, the accuracy,
    and the routing of the first `keep_images` images (for the tinted grid)."""
    model.eval()
    cfg = model.config
    first = 1 if cfg.pool == "cls" else 0
    positions = cfg.num_tokens - first
    layers = find_moe_layers(model)
    counts: dict[str, RoutingCounts] = {}
    kept_images, kept_routes = [], {}
    correct = total = 0
    for x, y in loader:
        with collect_moe_outputs(model, record=True) as moe:
            logits = model(x)
        correct += int((logits.argmax(-1) == y).sum())
        total += y.numel()
        stats, routing = moe.stats(), moe.routing()
        B = x.shape[0]
        for name, m in layers:
            if name not in routing:
                continue  # e.g. a merged random layer: no routing in evaluation
            c = counts.setdefault(name, RoutingCounts(classes, positions, m.num_experts, x.device))
            for call in routing[name]:
                c.add(call["expert_T"].view(B, -1), y, first)
            s = stats[name]
            c.load += s["load"].double()
            c.entropy += float(s.get("entropy", torch.tensor(float("nan"))))
            c.dropped += float(s["dropped_frac"])
            c.calls += 1
        need = keep_images - sum(len(i) for i in kept_images)
        if need > 0:
            kept_images.append(x[:need].cpu())
            for name in routing:
                kept_routes.setdefault(name, []).append(routing[name][0]["expert_T"].view(B, -1)[:need, first:].cpu())
    return {"acc": 100.0 * correct / max(total, 1), "images": total, "counts": counts,
            "kept_images": torch.cat(kept_images) if kept_images else None,
            "kept_routes": {k: torch.cat(v) for k, v in kept_routes.items()}}


def layer_summary(c: RoutingCounts, dead_threshold: float = DEAD_THRESHOLD) -> dict:
    """Numbers of one layer: load shares, balance (coefficient of variation and max/mean of the
    load), mean router entropy, mean dropped fraction, and dead experts."""
    load = c.load / c.load.sum().clamp_min(1)
    E = c.experts
    dead = dead_experts(c.load, dead_threshold)
    return {"experts": E, "load_share": [round(float(v), 6) for v in load],
            "load_cv": float(load.std(unbiased=False) / load.mean().clamp_min(1e-12)),
            "load_max_over_mean": float(load.max() / load.mean().clamp_min(1e-12)),
            "router_entropy": c.entropy / max(c.calls, 1), "dropped_frac": c.dropped / max(c.calls, 1),
            "dead_experts": dead,
            "class_expert_shares": [[round(float(v), 6) for v in row] for row in shares(c.by_class)]}


# --- randomly routed models -------------------------------------------------------------------
def random_layers(model: nn.Module) -> list[tuple[str, MoEMlp]]:
    return [(n, m) for n, m in find_moe_layers(model) if isinstance(m, MoEMlp) and isinstance(m.router, RandomRouter)]


@contextlib.contextmanager
def routed_as(model: nn.Module, eval_mode: str, fixed_expert: int | None = None) -> Iterator[None]:
    """Evaluate every randomly routed layer in `eval_mode` (and, with `fixed_expert`, through
    that one expert everywhere); the layers' settings are restored afterwards."""
    saved = [(m, m.eval_mode, m.router.fixed_expert) for _, m in random_layers(model)]
    for m, _, _ in saved:
        m.eval_mode = "random" if fixed_expert is not None else eval_mode
        m.router.fixed_expert = fixed_expert
    try:
        yield
    finally:
        for m, mode, fixed in saved:
            m.eval_mode, m.router.fixed_expert = mode, fixed


def accuracy(model: nn.Module, loader) -> float:
    from ..training.evaluation.evaluate import evaluate

    return evaluate(model, loader, next(model.parameters()).device)["acc"]


def expert_drift(m: MoEMlp) -> float:
    """Mean over experts of ||theta_e - mean|| / ||mean||, theta = all of an expert's weights
    and biases (0 when every expert is the average, as right after merging)."""
    params = [p.detach().double().reshape(p.shape[0], -1) for p in m.experts.all_weights()]
    theta = torch.cat(params, dim=1)
    mean = theta.mean(0, keepdim=True)
    return float((theta - mean).norm(dim=1).mean() / mean.norm().clamp_min(1e-30))


def random_routing_report(model: nn.Module, loader, seed: int = 0) -> dict | None:
    """Accuracies (each expert alone, merged, ensemble, random routes) and drift per layer."""
    layers = random_layers(model)
    if not layers:
        return None
    experts = {m.num_experts for _, m in layers}
    out: dict = {"drift": {name: expert_drift(m) for name, m in layers}}
    for mode in ("merged", "ensemble"):
        with routed_as(model, mode):
            out[f"{mode}_acc"] = accuracy(model, loader)
    torch.manual_seed(seed)
    with routed_as(model, "random"):
        out["random_acc"] = accuracy(model, loader)
    if len(experts) == 1 and all(m.top_k == 1 for _, m in layers):
        out["per_expert_acc"] = []
        for e in range(experts.pop()):
            with routed_as(model, "random", fixed_expert=e):
                out["per_expert_acc"].append(accuracy(model, loader))
    return out


__all__ = ["record_routing", "layer_summary", "class_expert_shares", "random_routing_report", "expert_drift",
           "routed_as", "shares", "dead_experts", "DEAD_THRESHOLD"]
