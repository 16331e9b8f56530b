"""BatchNorm running statistics of merged models: why they are recomputed, and how.

A BatchNorm layer normalises its input ``x`` with running estimates of ``E[x]`` and
``Var[x]`` per channel, measured on the data *through the model that owns them*. After a
merge the layers below a BatchNorm are new weights, so the merged model's activations have
other statistics than any expert's: the mean of a ReLU network's activations is not linear
in its weights, and interpolated weights shrink the activations' variance ("variance
collapse", Jordan et al., *REPAIR*, ICLR 2023, https://arxiv.org/abs/2211.08403). Averaging
(or task-arithmetic-ing) the experts' ``running_mean``/``running_var`` therefore gives
statistics of no model at all; each layer mis-normalises and the error compounds with depth.
Keeping the pre-trained model's statistics is wrong for the same reason. The fix used for
averaged weights since SWA (Izmailov et al., UAI 2018, https://arxiv.org/abs/1803.05407,
``torch.optim.swa_utils.update_bn``) is to re-estimate them: reset, then run training data
through the merged model with BatchNorm in training mode and ``momentum=None`` (a cumulative
average over batches), gradients off. :func:`recompute_batchnorm_statistics` does that,
leaving every other layer in eval mode (no dropout) and restoring each layer's mode and
momentum afterwards.

Per batch, BatchNorm normalises with that batch's own statistics, so the estimate is the
average over batches of each batch's mean and unbiased variance: with one batch holding all
samples it is exactly the mean and unbiased variance of each layer's input over the data.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = [
    "BATCHNORM_TYPES",
    "has_batchnorm",
    "batchnorm_layers",
    "recompute_batchnorm_statistics",
    "is_batchnorm_buffer",
]

BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_batchnorm_buffer(key: str) -> bool:
    """Whether a state-dict key names a BatchNorm running statistic (``…running_mean`` etc.)."""
    return key.rsplit(".", 1)[-1] in BATCHNORM_BUFFERS


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every BatchNorm layer tracking running statistics."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BATCHNORM_TYPES) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics."""
    return bool(batchnorm_layers(model))


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``batches`` (in place).

    Args:
        model: the (merged) model.
        batches: input batches (e.g. pixel values (B, 3, H, W)) on the model's device.
        forward: ``(model, batch) -> anything``; default ``model(batch)``.

    Returns:
        the number of samples seen (0: no batch, statistics unchanged).
    """
    layers = [m for _, m in batchnorm_layers(model)]
    if not layers:
        return 0
    momenta = [(m, m.momentum) for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    seen, reset = 0, False
    try:
        model.eval()
        for batch in batches:
            if not reset:  # reset only once there is data
                for m in layers:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative moving average
                    m.train()
                reset = True
            (forward or (lambda mod, x: mod(x)))(model, batch)
            seen += int(batch.shape[0])
    finally:
        for m, training in modes:
            m.training = training
        for m, momentum in momenta:
            m.momentum = momentum
    return seen
