"""Diagonal Fisher information of a classifier's parameters, from unlabelled inputs.

Matena & Raffel, *Merging Models with Fisher-Weighted Averaging*, NeurIPS 2022.
https://arxiv.org/abs/2111.09832. The Fisher of parameter θ at input x is
``E_{y ~ p(y|x)} (∂ log p(y|x) / ∂θ)²`` (labels are never used: y is drawn from the model's own
prediction). Two estimators over N inputs:

* ``"batch"`` (the reference implementation's, FusionBench/MergeLM; the default): per batch, one
  backward pass of ``Σ_b Σ_c sqrt(p_bc) · log p_bc`` (``p`` detached), the squared gradient added
  to ``F``, and ``F /= N`` at the end. Cheap (one backward per batch), but it squares *batch sums*,
  so cross terms between samples and classes enter ``F``.
* ``"per_example"`` (the paper's definition): ``F = (1/N) Σ_n Σ_c p_nc (∂ log p_nc / ∂θ)²``, the
  exact expectation over classes for each input; one forward per input and one backward per class
  (N · C backward passes: for few-class tasks or small models).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["FISHER_ESTIMATORS", "batch_fisher_objective", "diagonal_fisher"]

FISHER_ESTIMATORS = ("batch", "per_example")
Forward = Callable[[torch.Tensor], torch.Tensor]
Term = tuple[tuple[torch.Tensor | None, ...], float | torch.Tensor]  # (∂/∂θ of every parameter, weight of its square)


def batch_fisher_objective(logits: torch.Tensor) -> torch.Tensor:
    """``Σ_b Σ_c sqrt(p_bc) · log_softmax(logits)_bc`` with ``p`` detached (the reference's objective).

    Args:
        logits: ``(B, C)``.

    Returns:
        a scalar whose squared gradient is the batch's contribution to the ``"batch"`` Fisher.
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1).detach()  # (B, C)
    return (probs.sqrt() * torch.log_softmax(logits, dim=-1)).sum()


def _add_squared(
    fisher: dict[str, torch.Tensor],
    names: list[str],
    grads: Iterable[torch.Tensor | None],
    weight: float | torch.Tensor = 1.0,
) -> None:
    for name, grad in zip(names, grads):
        if grad is not None:
            fisher[name] += weight * grad.detach().float().square()


def _batch_terms(forward: Forward, inputs: torch.Tensor, params: list[nn.Parameter]) -> Iterator[Term]:
    """The ``"batch"`` estimator on one batch: the gradient of :func:`batch_fisher_objective`, weight 1."""
    objective = batch_fisher_objective(forward(inputs))
    yield torch.autograd.grad(objective, params, allow_unused=True), 1.0


def _per_example_terms(forward: Forward, inputs: torch.Tensor, params: list[nn.Parameter]) -> Iterator[Term]:
    """The ``"per_example"`` estimator on one batch: ``∂ log p_bc / ∂θ`` weighted by ``p_bc``, per input and class."""
    for b in range(inputs.shape[0]):
        log_probs = torch.log_softmax(forward(inputs[b : b + 1]).float(), dim=-1)[0]  # (C,)
        probs = log_probs.detach().exp()  # (C,)
        last = log_probs.shape[0] - 1
        for c in range(log_probs.shape[0]):
            yield torch.autograd.grad(log_probs[c], params, retain_graph=c < last, allow_unused=True), probs[c]


def diagonal_fisher(
    forward: Forward,
    batches: Iterable[torch.Tensor],
    parameters: Mapping[str, nn.Parameter],
    *,
    estimator: str = "batch",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The diagonal Fisher of ``parameters`` over the inputs of ``batches`` (see module docstring).

    Args:
        forward: inputs ``(B, ...)`` -> logits ``(B, C)``; differentiable in ``parameters``.
        batches: input tensors (labels are not needed).
        parameters: ``{name: parameter}`` to estimate the Fisher of.
        estimator: ``"batch"`` (reference) or ``"per_example"`` (the paper's definition).
        on_batch: called with each batch's size after it is processed (progress, logging).

    Returns:
        ``({name: F}, N)``: float32 tensors shaped like the parameters (on their devices), divided
        by N, the number of inputs seen. A parameter the logits do not depend on has ``F = 0``.
    """
    if estimator not in FISHER_ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {estimator!r}; choose one of {FISHER_ESTIMATORS}")
    names, params = list(parameters), list(parameters.values())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    terms = _batch_terms if estimator == "batch" else _per_example_terms
    count = 0
    for inputs in batches:
        for grads, weight in terms(forward, inputs, params):
            _add_squared(fisher, names, grads, weight)
        count += inputs.shape[0]
        if on_batch is not None:
            on_batch(inputs.shape[0])
    if count == 0:
        raise ValueError("diagonal_fisher: no inputs")
    return {name: f / count for name, f in fisher.items()}, count
