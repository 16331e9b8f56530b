"""First-order Taylor expansion of a module around fixed parameters, with ``torch.func.jvp``.

Ortiz-Jiménez et al., *Task Arithmetic in the Tangent Space*, NeurIPS 2023 (https://arxiv.org/abs/2305.12827);
Tang et al., *Parameter Efficient Multi-task Model Fusion with Partial Linearization* (L-LoRA),
ICLR 2024 (https://arxiv.org/abs/2310.04742)::

    f_lin(x; p) = f(x; p0) + J_p f(x; p0) · (p − p0)

over the module's *trainable* parameters ``p`` (frozen ones stay at their values); ``p0`` is kept
as buffers (the "linearization point"). The output is linear in ``p``, so the model trains in
the tangent space of ``p0``.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp

__all__ = ["LinearizedModule"]


def _buffer_name(param_name: str) -> str:
    return param_name.replace(".", "__")  # buffer names may not contain dots


class LinearizedModule(nn.Module):
    """``module`` linearised around ``point`` (default: its current trainable parameters).

    Args:
        module: the module to linearise; its parameters with ``requires_grad`` are the variables.
        point: ``{parameter name: value}`` of the linearization point (None: the current values).
    """

    def __init__(self, module: nn.Module, point: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.module = module
        self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.point = nn.Module()
        params = dict(module.named_parameters())
        for name in self.param_names:
            value = params[name] if point is None else point[name]
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"linearization point of {name!r} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}"
                )
            self.point.register_buffer(_buffer_name(name), value.detach().clone().to(params[name]))

    def point_values(self) -> dict[str, torch.Tensor]:
        """``{parameter name: p0}``."""
        return {n: getattr(self.point, _buffer_name(n)) for n in self.param_names}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = dict(self.module.named_parameters())
        p0 = tuple(self.point_values().values())
        dp = tuple(params[n] - q for n, q in zip(self.param_names, p0))

        def f(*values: torch.Tensor) -> Any:
            return functional_call(self.module, dict(zip(self.param_names, values)), args, kwargs)

        out, tangent = jvp(f, p0, dp)  # f(x; p0), J(p0)·(p − p0)
        return out + tangent
