"""Collecting what MoE layers produce in a forward pass: auxiliary losses and routing statistics.

    with collect_moe_outputs(model) as moe:
        logits = model(x)
    loss = task_loss + moe.aux_loss()      # one weight per term, from each layer's MoEConfig
    moe.aux_terms(), moe.stats()           # detached, for logging

The losses come out of the `with` block as values; no layer keeps them afterwards. A layer
called several times in one forward (WideNet's shared layer) contributes every call: its loss
counts each block's routing, its load sums over calls and its rates average over them.
VisionTransformer's `forward(x, return_aux=True)` returns these in a ModelOutput.

`dead_experts` reads those load statistics (a layer's per-expert load): the experts routing left
(nearly) unused, which the trainer warns about each epoch and `vitmoe analyze` reports.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from .base_layer import MoELayer, find_moe_layers


class MoECollector:
    def __init__(self, names: dict[int, str], record: bool = False):
        self._names = names
        self.record = record
        """Whether the layers also report per-token routing (analysis; off in training)."""
        self._calls: dict[int, tuple[MoELayer, list[dict[str, Tensor]], list[dict[str, Tensor]]]] = {}
        self._routing: dict[int, list[dict[str, Tensor]]] = {}

    def add(self, layer: MoELayer, aux: dict[str, Tensor], stats: dict[str, Tensor],
            routing: dict[str, Tensor] | None = None) -> None:
        _, auxes, stat_list = self._calls.setdefault(id(layer), (layer, [], []))
        auxes.append(aux)
        stat_list.append(stats)
        if routing is not None:
            self._routing.setdefault(id(layer), []).append(routing)

    def routing(self) -> dict[str, list[dict[str, Tensor]]]:
        """Per layer name, one dict per call of the per-token routing the layer recorded
        (`expert_T`: the token's expert, -1 for none; expert choice also `experts_per_token_T`)."""
        return {self._names[key]: calls for key, calls in self._routing.items()}

    def _summed_aux(self) -> Iterator[tuple[MoELayer, dict[str, Tensor], int]]:
        for layer, auxes, _ in self._calls.values():
            summed: dict[str, Tensor] = {}
            for aux in auxes:
                summed = {k: summed[k] + v if k in summed else v for k, v in aux.items()}
            yield layer, summed, len(auxes)

    def aux_loss(self, device: torch.device | str = "cpu") -> Tensor:
        """Sum over layers (and calls) of weight x term: add it to the task loss. Zero without MoE."""
        total = torch.zeros((), device=device)
        for layer, summed, _ in self._summed_aux():
            weighted = [layer.aux_weights[k] * v for k, v in summed.items() if layer.aux_weights.get(k)]
            if weighted:
                total = total + torch.stack(weighted).sum()
        return total

    def layer_aux(self) -> dict[str, dict[str, Tensor]]:
        """Per layer name: each unweighted term summed over the layer's calls (still in the graph)."""
        return {self._names[id(layer)]: summed for layer, summed, _ in self._summed_aux()}

    def aux_terms(self) -> dict[str, Tensor]:
        """Each term unweighted and detached: its mean over calls, then over layers."""
        by_name: dict[str, list[Tensor]] = {}
        for _, summed, calls in self._summed_aux():
            for k, v in summed.items():
                by_name.setdefault(k, []).append(v.detach() / calls)
        return {k: torch.stack(v).mean() for k, v in by_name.items()}

    @torch.no_grad()
    def stats(self) -> dict[str, dict[str, Tensor]]:
        """Per layer name: expert load [E] (copies, summed over calls), dropped_frac, entropy, ...
        (rates averaged over calls)."""
        out = {}
        for key, (_, _, stat_list) in self._calls.items():
            merged = stat_list[0]
            for n, s in enumerate(stat_list[1:], start=2):
                merged = {k: merged[k] + v if k == "load" else merged[k] + (v - merged[k]) / n for k, v in s.items()}
            out[self._names[key]] = merged
        return out


@contextlib.contextmanager
def collect_moe_outputs(model: nn.Module, record: bool = False) -> Iterator[MoECollector]:
    """Collect the auxiliary losses and statistics of every MoE layer of `model` (or `model`
    itself, when it is one) during the forward passes run inside the block. With `record`, the
    layers also report where every token went (`collector.routing()`); outputs are unchanged."""
    layers = find_moe_layers(model)
    collector = MoECollector({id(m): name for name, m in layers}, record)
    for _, m in layers:
        m._collectors.append(collector)
    try:
        yield collector
    finally:
        for _, m in layers:
            m._collectors.remove(collector)


DEAD_THRESHOLD = 0.1
"""An expert is dead when its share of a layer's load is below this times the uniform share 1/E."""


def dead_experts(load, dead_threshold: float = DEAD_THRESHOLD) -> list[int]:
    """Experts whose share of a layer's load is below `dead_threshold` x the uniform share 1/E."""
    load = torch.as_tensor(load, dtype=torch.float64)
    share = load / load.sum().clamp_min(1)
    return [int(i) for i in torch.nonzero(share < dead_threshold / load.numel()).flatten()]


def dead_experts_by_layer(expert_load: dict | None) -> dict[str, list[int]]:
    """Per MoE layer, the experts an epoch's routing left (nearly) unused (`expert_load`: the
    metrics row's per-layer loads)."""
    found = {name: dead_experts(load) for name, load in (expert_load or {}).items() if len(load) > 1}
    return {name: experts for name, experts in found.items() if experts}
