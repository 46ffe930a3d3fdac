"""Super-classes from a confusion matrix: the class -> expert map that guides per-image routers.

Mobile V-MoE (Daxberger et al. 2023) trains a dense model, reads its confusion matrix
and groups the classes it confuses into as many super-classes as there are experts, so that each
expert specialises in classes that are hard to tell apart; the router is then trained to send an
image to its class's super-class (`moe.superclasses`, vitmoe.moe.routers.image).

The grouping here is a balanced agglomerative clustering: the affinity of two classes is how often
either is taken for the other (the row-normalised confusion, symmetrised), groups start as single
classes, and the two groups of highest average affinity merge while the merged group stays within
ceil(classes / experts) classes, until there are as many groups as experts (the bound grows by
one only when no two groups fit it). Groups are numbered by their smallest class.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """[classes, classes] counts: row = true class, column = predicted class."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def superclasses_from_confusion(confusion: Tensor, num_experts: int) -> list[int]:
    """The expert (super-class) of each class: `num_experts` balanced groups of the classes the
    confusion matrix (row = true class) shows confused with each other."""
    confusion = torch.as_tensor(confusion, dtype=torch.float64)
    classes = confusion.shape[0]
    if confusion.dim() != 2 or confusion.shape[1] != classes:
        raise ValueError(f"confusion matrix of shape {list(confusion.shape)}: must be square [classes, classes]")
    if not 1 <= num_experts <= classes:
        raise ValueError(f"{num_experts} super-classes for {classes} classes: between 1 and the number of classes")
    rates = confusion / confusion.sum(1, keepdim=True).clamp_min(1)
    affinity = rates + rates.T
    affinity.fill_diagonal_(0)
    groups = [[c] for c in range(classes)]
    bound = math.ceil(classes / num_experts)
    while len(groups) > num_experts:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                if len(groups[i]) + len(groups[j]) > bound:
                    continue
                link = affinity[groups[i]][:, groups[j]].mean().item()
                if best is None or link > best[0]:
                    best = (link, i, j)
        if best is None:  # every merge would pass the bound: relax it by one class
            bound += 1
            continue
        _, i, j = best
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    groups.sort(key=min)
    expert_of_class = [0] * classes
    for expert, members in enumerate(groups):
        for c in members:
            expert_of_class[c] = expert
    return expert_of_class


__all__ = ["confusion_matrix", "superclasses_from_confusion"]
