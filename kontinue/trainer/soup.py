"""Model soups (Wortsman et al. 2022, as AutoMM's optim.top_k_average_method): the weights of
several validated states averaged into one model, uniformly or greedily."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

State = dict[str, torch.Tensor]


class _Sum:
    """A running float64 sum of states: floating tensors are averaged, others (counters, ids)
    are taken from the first state."""

    def __init__(self, state: State):
        self.total = {k: v.to(torch.float64) if v.is_floating_point() else v.clone() for k, v in state.items()}
        self.count = 1

    def plus(self, state: State) -> "_Sum":
        summed = _Sum.__new__(_Sum)
        summed.total = {k: v + state[k].to(torch.float64) if v.is_floating_point() else v
                        for k, v in self.total.items()}
        summed.count = self.count + 1
        return summed

    def mean(self, like: State) -> State:
        return {k: (v / self.count).to(like[k].dtype) if v.is_floating_point() else v.clone()
                for k, v in self.total.items()}


@dataclass
class Soup:
    state: State
    steps: list[int]  # the steps of the states in it
    score: float | None  # its validation score, when the method measured it


def make_soup(candidates: list[dict[str, Any]], method: str, load: Callable[[dict[str, Any]], State],
              score: Callable[[State], float], higher_is_better: bool) -> Soup:
    """`candidates` best first ({"step", "score", ...}); `load` gives one's weights, `score` the
    validation score of weights. best: the first alone. uniform_soup: the mean of all. greedy_soup:
    the first, then each next one in turn is kept if the mean with it scores at least as well."""
    first = load(candidates[0])
    if method == "best" or len(candidates) == 1:
        return Soup(first, [candidates[0]["step"]], candidates[0]["score"])
    total, steps = _Sum(first), [candidates[0]["step"]]
    if method == "uniform_soup":
        for candidate in candidates[1:]:
            total, steps = total.plus(load(candidate)), steps + [candidate["step"]]
        return Soup(total.mean(first), steps, None)
    best = candidates[0]["score"]
    for candidate in candidates[1:]:
        trial = total.plus(load(candidate))
        trial_score = score(trial.mean(first))
        if trial_score >= best if higher_is_better else trial_score <= best:
            total, steps, best = trial, steps + [candidate["step"]], trial_score
    return Soup(total.mean(first), steps, best)
