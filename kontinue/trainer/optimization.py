"""AutoMM's optimisation recipe as pure functions of a module and the hyperparameters: which
parameters decay, their learning rates by `optim.lr_choice` (layer-wise decay, two stages, a single
rate) and the warm-up and decay schedules. Layer ids count from the output end: 0 is the head and
whatever else trains from scratch, the input embeddings have the highest id."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

NORM_LAYERS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)


def decayed_parameter_names(module: nn.Module) -> set[str]:
    """Weight decay applies to weights, not to biases or normalisation layers (AutoMM's rule)."""
    names = set()
    for module_name, child in module.named_modules():
        if isinstance(child, NORM_LAYERS):
            continue
        for name, _ in child.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if "bias" not in name and "cls_token" not in full:
                names.add(full)
    return names


def encoder_layer_ids(names: Iterable[str], model: str, pre_encoder: tuple[str, ...],
                      post_encoder: tuple[str, ...]) -> dict[str, int]:
    """AutoMM's layer ids for a pretrained model under attribute `model`: the numbered blocks of its
    encoder in order, what matches `pre_encoder` (embeddings) below them, what matches
    `post_encoder` (pooler, final norm) at 0 with everything outside `model`. A model the rule does
    not fit gets one id for all its parameters (0), as in AutoMM."""
    names = list(names)
    inside = [n for n in names if n.startswith(model + ".")]
    ids = dict.fromkeys(names, 0)
    encoder: dict[str, int] = {}
    pre, post = [], []
    layer, last_index, last_child = 0, None, None
    for name in inside:
        child = name[len(model) + 1:].split(".")[0]
        index = next((part for part in name.split(".") if part.isdigit()), None)
        if index is not None and not any(p in name for p in post_encoder):
            if index != last_index or child != last_child:
                layer += 1
                last_index, last_child = index, child
            encoder[name] = layer
        elif any(p in name for p in pre_encoder):  # before post_encoder: patch_embed.norm is an embedding
            pre.append(name)
        elif any(p in name for p in post_encoder):
            post.append(name)
        else:
            return ids  # neither encoder nor a known part: AutoMM's fallback
    if not encoder and pre:
        return ids
    top = layer + 1  # the pre-encoder part sits one below the first block
    ids.update({name: top - block for name, block in encoder.items()})
    ids.update(dict.fromkeys(pre, top))
    ids.update(dict.fromkeys(post, 0))
    return ids


def parameter_groups(module: nn.Module, layer_ids: dict[str, int], hp: dict[str, Any]) -> list[dict[str, Any]]:
    """Optimizer groups for `optim.lr_choice`, by layer id (a parameter `layer_ids` does not name,
    such as the head's, is at 0):
    - layerwise_decay: a parameter at layer id k trains at lr * lr_decay**k;
    - two_stages: layer id 0 (the head, a pooler) trains at lr * lr_mult, the rest at lr;
    - single_stage: one rate.
    Each with and without weight decay; frozen parameters are left out."""
    lr, choice = hp["optim.lr"], hp["optim.lr_choice"]
    decayed = decayed_parameter_names(module)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        if choice == "layerwise_decay":
            rate = lr * hp["optim.lr_decay"] ** layer_ids.get(name, 0)
        elif choice == "two_stages" and layer_ids.get(name, 0) == 0:
            rate = lr * hp["optim.lr_mult"]
        else:
            rate = lr
        groups.setdefault((rate, name in decayed), []).append(parameter)
    return [{"params": params, "lr": rate, "weight_decay": hp["optim.weight_decay"] if decays else 0.0}
            for (rate, decays), params in sorted(groups.items(), key=lambda item: (-item[0][0], not item[0][1]))]


def create_optimizer(groups: list[dict[str, Any]], hp: dict[str, Any]) -> torch.optim.Optimizer:
    """AutoMM's optimizers with its constants (AdamW's eps 1e-6, not torch's 1e-8; SGD's momentum 0.9)."""
    optimizer_type, lr = hp["optim.optim_type"], hp["optim.lr"]
    if optimizer_type == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if optimizer_type == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=1e-6, betas=(0.9, 0.999))
    return torch.optim.Adam(groups, lr=lr)


def warmup_steps(hp: dict[str, Any], total_steps: int) -> int:
    """`optim.warmup_steps` up to 1 is a fraction of all steps, above 1 a number of steps."""
    value = hp["optim.warmup_steps"]
    return int(value * total_steps) if value <= 1 else int(value)


def schedule(hp: dict[str, Any], total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step: linear warm-up from 0, then `optim.lr_schedule`
    (the transformers formulas AutoMM uses; polynomial_decay ends at optim.end_lr)."""
    warmup, name = warmup_steps(hp, total_steps), hp["optim.lr_schedule"]
    decay_steps = max(1, total_steps - warmup)
    end_factor = hp["optim.end_lr"] / hp["optim.lr"] if hp["optim.lr"] else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        if name == "cosine_decay":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "linear_decay":
            return max(0.0, 1.0 - progress)
        if name == "polynomial_decay":
            return (1.0 - end_factor) * (1.0 - progress) + end_factor
        return 1.0  # constant
    return factor
