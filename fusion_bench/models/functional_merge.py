"""A merged model as a differentiable function of its merging coefficients (AdaMerging, Concrete).

For every parameter tensor ``k`` of the model (``L`` of them, in ``named_parameters`` order)::

    θ_k = θ0_k + m_k ⊙ Σ_t λ[t, k] τ_{t,k}          τ_t = θ_t − θ0,  t = 1..T

``λ`` is ``(T,)`` (task-wise: one coefficient per task) or ``(T, L)`` (layer-wise: one per task
and tensor); ``m`` is an optional mask per tensor shared by all tasks (Concrete subspace).

The task vectors are held once, stacked per tensor as ``(T, *shape)``
(:class:`TaskVectorStack`); :func:`merge_parameters` computes the merged tensors with autograd
tracking ``λ`` and ``m``, and :class:`FunctionalMergedModel` runs one skeleton module (which
holds ``θ0``) on them with :func:`torch.func.functional_call`: no copy of the model per step.
:func:`unload` finally writes merged tensors into the skeleton and returns it as a plain model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "TaskVectorStack",
    "merge_parameters",
    "detached_leaves",
    "backward_into_merge",
    "FunctionalMergedModel",
    "unload",
]


@dataclass
class TaskVectorStack:
    """``θ0`` and the stacked task vectors of one model, keyed by the skeleton's parameter names.

    Attributes:
        models: the fine-tuned models' names (the order of the ``T`` axis).
        names: the parameter names, in the skeleton's ``named_parameters`` order (the ``L`` axis).
        base: ``{name: θ0}``.
        vectors: ``{name: (T, *shape)}`` task vectors.
    """

    models: tuple[str, ...]
    names: tuple[str, ...]
    base: dict[str, Tensor]
    vectors: dict[str, Tensor]

    @property
    def num_tasks(self) -> int:
        return len(self.models)

    @property
    def num_tensors(self) -> int:
        return len(self.names)

    def fingerprint(self) -> str:
        """A hash of the parameter names and shapes (what coefficients and masks are tied to)."""
        h = hashlib.blake2b(digest_size=12)
        for name in self.names:
            h.update(f"{name}:{tuple(self.base[name].shape)};".encode())
        return h.hexdigest()

    def summed(self) -> "TaskVectorStack":
        """One task vector ``Σ_t τ_t`` (in model order): task arithmetic with a shared mask needs no more.

        The per-task stacks are released as the sums are formed (peak: one extra tensor).
        """
        vectors = {}
        for name in self.names:
            stacked = self.vectors[name]  # (T, *shape)
            total = stacked[0].clone()
            for t in range(1, stacked.shape[0]):
                total += stacked[t]
            vectors[name] = total.unsqueeze(0)  # (1, *shape)
        return TaskVectorStack(("+".join(self.models),), self.names, self.base, vectors)

    def to(self, device: torch.device | str) -> "TaskVectorStack":
        """The stack on ``device`` (tensors already there are not copied)."""
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return TaskVectorStack(self.models, self.names, move(self.base), move(self.vectors))


def merge_parameters(
    stack: TaskVectorStack,
    coefficients: Tensor,
    mask: Mapping[str, Tensor] | None = None,
    *,
    clamp: tuple[float, float] | None = None,
) -> dict[str, Tensor]:
    """The merged tensors ``θ0 + m ⊙ Σ_t λ[t] τ_t`` (differentiable in ``coefficients`` and ``mask``).

    Args:
        stack: ``θ0`` and the task vectors.
        coefficients: ``(T,)`` task-wise or ``(T, L)`` layer-wise ``λ``.
        mask: ``{name: m}`` of the tensors' shapes (None: no mask).
        clamp: ``(low, high)`` bounds applied to ``λ`` first (None: unclamped).

    Returns:
        ``{name: merged tensor}`` for every name of the stack.
    """
    T, L = stack.num_tasks, stack.num_tensors
    if tuple(coefficients.shape) not in ((T,), (T, L)):
        raise ValueError(f"merging coefficients have shape {tuple(coefficients.shape)}; expected ({T},) or ({T}, {L})")
    lam = coefficients if clamp is None else coefficients.clamp(*clamp)
    lam = lam.unsqueeze(1).expand(T, L) if lam.dim() == 1 else lam  # (T, L)
    lam = lam.to(next(iter(stack.base.values())).dtype)
    merged = {}
    for k, name in enumerate(stack.names):
        delta = torch.tensordot(lam[:, k], stack.vectors[name], dims=1)  # (T,) · (T, *shape) -> (*shape)
        if mask is not None:
            delta = mask[name] * delta
        merged[name] = stack.base[name] + delta
    return merged


def detached_leaves(merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Leaf views of the merged tensors (no copy) that collect ``∂loss/∂θ`` over several backward passes."""
    return {k: v.detach().requires_grad_(True) for k, v in merged.items()}


def backward_into_merge(merged: Mapping[str, Tensor], leaves: Mapping[str, Tensor]) -> None:
    """Carry the gradients collected on ``leaves`` through the merge to ``λ`` and the mask.

    One vector-Jacobian product: afterwards ``λ.grad`` (and the mask logits' grads) are what a
    single backward pass from the losses through the merged tensors would give, while each
    loss's backward pass only held its own activations.
    """
    pairs = [(merged[k], leaves[k].grad) for k in merged if merged[k].requires_grad and leaves[k].grad is not None]
    if pairs:
        torch.autograd.backward([m for m, _ in pairs], [g for _, g in pairs])


class FunctionalMergedModel(nn.Module):
    """A skeleton module run on given parameters (:meth:`use`), as ``functional_call`` would run it.

    The skeleton's own parameters are frozen; buffers (e.g. position ids) come from it. Its
    forward signature is the skeleton's, so a ``CLIPVisionModel`` skeleton makes this a drop-in
    vision encoder (it returns ``pooler_output``). During each forward pass the given tensors
    stand in the skeleton's parameter slots (every name of a tied parameter gets the tensor given
    for any of them) and the skeleton's own are put back afterwards; the slots are looked up once,
    when the parameters are given, not at every forward pass. Names that are not parameters of
    the skeleton (buffers) go through :func:`torch.func.functional_call`.

    Args:
        skeleton: the module whose parameters are replaced (usually the one holding ``θ0``).
    """

    def __init__(self, skeleton: nn.Module) -> None:
        super().__init__()
        self.skeleton = skeleton.requires_grad_(False)
        self._params: Mapping[str, Tensor] | None = None
        self._assignments: list[tuple[dict[str, Any], str, Tensor]] | None = None
        groups: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for module_name, module in skeleton.named_modules(remove_duplicate=False):
            for attr, param in module._parameters.items():
                if param is not None:
                    name = f"{module_name}.{attr}" if module_name else attr
                    groups.setdefault(id(param), []).append((name, module, attr))
        self._groups = list(groups.values())  # each: every (name, module, slot) of one parameter
        self._names = {name for group in self._groups for name, _, _ in group}

    def use(self, params: Mapping[str, Tensor] | None) -> "FunctionalMergedModel":
        """Run on ``params`` (``{parameter name: tensor}``, every parameter of the skeleton) from now on;
        None: release them (a forward pass is then an error, never a silent run on the skeleton's own)."""
        self._params = params
        self._assignments = None
        if params is not None and self._names.issuperset(params):
            assignments = []
            for group in self._groups:
                given = next((params[name] for name, _, _ in group if name in params), None)
                if given is not None:
                    assignments += [(module._parameters, attr, given) for _, module, attr in group]
            self._assignments = assignments
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._params is None:
            raise RuntimeError("FunctionalMergedModel: call use(params) before the forward pass")
        if self._assignments is None:
            return functional_call(self.skeleton, dict(self._params), args, kwargs, strict=False)
        originals = [(slots, attr, slots[attr]) for slots, attr, _ in self._assignments]
        try:
            for slots, attr, tensor in self._assignments:
                slots[attr] = tensor
            return self.skeleton(*args, **kwargs)
        finally:
            for slots, attr, original in originals:
                slots[attr] = original


@torch.no_grad()
def unload(skeleton: nn.Module, params: Mapping[str, Tensor], *, dtype: torch.dtype | None = None) -> nn.Module:
    """Write ``params`` into ``skeleton`` (adopting them, no copy kept) and return it in eval mode,
    its parameters trainable again like any loaded model's.

    Args:
        skeleton: the module (modified in place).
        params: ``{parameter name: tensor}`` for every parameter.
        dtype: the returned parameters' dtype (None: the tensors' own).
    """
    own = dict(skeleton.named_parameters())
    missing = sorted(set(own) - set(params))
    if missing:
        raise ValueError(f"unload: no merged tensor for parameter(s) {missing[:3]}")
    for name, param in own.items():
        param.data = params[name].detach().to(dtype or params[name].dtype)
    return skeleton.requires_grad_(True).eval()
