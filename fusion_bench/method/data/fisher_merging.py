"""``clip_fisher_merging``: Fisher-weighted averaging of CLIP vision encoders.

Matena & Raffel, *Merging Models with Fisher-Weighted Averaging*, NeurIPS 2022.
https://arxiv.org/abs/2111.09832

Steps (the reference defaults behind the published tables; docs/algorithms.md):

1. For each fine-tuned model i, in pool order: the diagonal Fisher ``F_i`` of its parameters
   (:mod:`fusion_bench.models.fisher`), the classifier being the model behind its task's zero-shot
   head, on the first ``num_fisher_examples = 256`` images of the task's train split (unshuffled,
   ``dataloader_kwargs.batch_size = 32``; labels unused). ``fisher_estimator: batch`` is the
   reference's batch-level squared gradient, ``per_example`` the paper's exact per-input expectation.
2. ``n_i = ‖F_i‖₂`` over all parameters; with ``normalize_fisher_weight`` the model coefficients are
   ``c_i = (1 / (n_i + ε)) / Σ_j 1 / (n_j + ε)`` (else equal), ``ε = minimal_fisher_weight = 1e-6``.
3. ``θ = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε)`` per entry.

Float tensors without a Fisher (buffers) are averaged; tensors matching ``exclude_param_names_regex``
keep their pre-trained values (as in the reference). The merge is streamed: the normalising sum of
the ``c_i`` cancels between numerator and denominator, so each model adds ``c̃_i (F_i + ε) θ_i`` and
``c̃_i (F_i + ε)`` with ``c̃_i = 1 / (n_i + ε)`` and is dropped: one model and its Fisher in memory.
Differences from the reference: exactly ``num_fisher_examples`` images are used (it rounds up to
whole batches); heads are cached by content hash.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.method.data.base import PairedSums, PerModelDataMerge, canonical_parameter_names, merge_all
from fusion_bench.method._options import check_bool, check_choice, check_range
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.models.fisher import FISHER_ESTIMATORS, diagonal_fisher
from fusion_bench.utils.instantiate import to_container

__all__ = [
    "fisher_norm",
    "fisher_coefficients",
    "FisherAccumulator",
    "fisher_weighted_average",
    "FisherMergingForCLIPVisionModel",
]

NAME = "clip_fisher_merging"
StateDict = Mapping[str, torch.Tensor]


def fisher_norm(fisher: StateDict) -> float:
    """``‖F‖₂`` over every tensor of ``fisher`` (float64)."""
    return math.sqrt(sum(float(f.double().square().sum()) for f in fisher.values()))


def fisher_coefficients(norms: Sequence[float], *, normalize: bool, minimal_fisher_weight: float) -> list[float]:
    """The model coefficients ``c_i``: ``1/(n_i + ε)`` normalised to sum 1 (``normalize``), else ``1/T``."""
    if not normalize:
        return [1.0 / len(norms)] * len(norms)
    inverse = [1.0 / (n + minimal_fisher_weight) for n in norms]
    return [v / sum(inverse) for v in inverse]


class FisherAccumulator(PairedSums):
    """``Σ c̃_i (F_i + ε) θ_i`` and ``Σ c̃_i (F_i + ε)`` over the models added, in order.

    Args:
        normalize: weight models by ``c̃_i = 1/(‖F_i‖ + ε)`` (else 1).
        minimal_fisher_weight: ε, added to every Fisher entry.
    """

    def __init__(self, *, normalize: bool = True, minimal_fisher_weight: float = 1e-6) -> None:
        super().__init__()
        self.normalize, self.eps = normalize, minimal_fisher_weight

    def add(self, params: StateDict, fisher: StateDict) -> float:
        """Fold in one model's float tensors ``params`` and its Fisher (a subset of the keys).

        Returns:
            the model's ``‖F‖₂``.
        """
        norm = fisher_norm(fisher)
        coefficient = 1.0 / (norm + self.eps) if self.normalize else 1.0
        for key, f in fisher.items():
            weight = coefficient * (f.float() + self.eps)  # same shape as the tensor
            self.add_pair(key, weight * params[key], weight)
        self.others.add({k: v for k, v in params.items() if k not in fisher})
        return norm

    def combine(self, key: str, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        return numerator / denominator


def fisher_weighted_average(
    params: Sequence[StateDict],
    fishers: Sequence[StateDict],
    *,
    normalize_fisher_weight: bool = True,
    minimal_fisher_weight: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Fisher merging of whole state dicts (the pure core; see module docstring, steps 2-3).

    Args:
        params: the models' float tensors.
        fishers: each model's Fisher, for the keys to Fisher-weight (the others are averaged).
        normalize_fisher_weight: weight models by the inverse norm of their Fisher.
        minimal_fisher_weight: ε.

    Returns:
        the merged tensors.
    """
    acc = FisherAccumulator(normalize=normalize_fisher_weight, minimal_fisher_weight=minimal_fisher_weight)
    return merge_all(acc, params, fishers)


@register_algorithm(NAME)
class FisherMergingForCLIPVisionModel(PerModelDataMerge):
    """Fisher merging of a CLIP pool's fine-tuned vision encoders (see module docstring).

    Args:
        exclude_param_names_regex: regexes (``re.match`` on canonical keys such as
            ``encoder.layers.0.mlp.fc1.weight``) of tensors that keep their pre-trained values.
        normalize_fisher_weight: weight each model by ``1/‖F_i‖`` (normalised).
        minimal_fisher_weight: ε added to every Fisher entry.
        num_fisher_examples: images of each task's train split used.
        dataloader_kwargs: ``batch_size``, ``num_workers``, ``shuffle`` (false: the first images).
        fisher_estimator: ``"batch"`` (reference) or ``"per_example"`` (the paper's).
        clip_model: the full CLIP giving the zero-shot heads (null: the ``_pretrained_`` entry).
        seed: seeds the subset when ``dataloader_kwargs.shuffle``.
        checkpoint_path: file saved after each model; a rerun resumes from it (null: none).
    """

    def __init__(
        self,
        *,
        exclude_param_names_regex: Sequence[str] = (),
        normalize_fisher_weight: bool = True,
        minimal_fisher_weight: float = 1e-6,
        num_fisher_examples: int = 256,
        dataloader_kwargs: Mapping[str, Any] | None = None,
        fisher_estimator: str = "batch",
        clip_model: Any = None,
        seed: int = 42,
        checkpoint_path: str | None = None,
    ) -> None:
        self._init_data_options(
            num_examples=("num_fisher_examples", num_fisher_examples),
            dataloader_kwargs=dataloader_kwargs,
            exclude_param_names_regex=exclude_param_names_regex,
            seed=seed,
            checkpoint_path=checkpoint_path,
        )
        self.num_fisher_examples = self._num_examples
        self.normalize_fisher_weight = check_bool(NAME, "normalize_fisher_weight", normalize_fisher_weight)
        self.minimal_fisher_weight = check_range(
            NAME, "minimal_fisher_weight", minimal_fisher_weight, low=0.0, low_open=True
        )
        self.fisher_estimator = check_choice(NAME, "fisher_estimator", fisher_estimator, FISHER_ESTIMATORS)
        self.clip_model = to_container(clip_model)

    def _clip_model(self) -> Any:
        return self.clip_model

    def _options(self) -> dict[str, Any]:
        return {
            **super()._options(),
            "normalize_fisher_weight": self.normalize_fisher_weight,
            "minimal_fisher_weight": self.minimal_fisher_weight,
            "fisher_estimator": self.fisher_estimator,
        }

    def _new_accumulator(self) -> FisherAccumulator:
        return FisherAccumulator(
            normalize=self.normalize_fisher_weight, minimal_fisher_weight=self.minimal_fisher_weight
        )

    def _add_model(
        self, acc: FisherAccumulator, name: str, model: nn.Module, batches: Any, fabric: Any, data: CLIPTaskClassifiers
    ) -> dict[str, Any]:
        tensors = self.model_tensors(data.modelpool, name, model)
        keys = {pname: key for pname, key in canonical_parameter_names(data.modelpool, model).items() if key in tensors}
        model.requires_grad_(False)
        classifier = fabric.to_device(data.classifier(model, name))
        params = {keys[pname]: p.requires_grad_(True) for pname, p in model.named_parameters() if pname in keys}

        def forward(pixel_values: torch.Tensor) -> torch.Tensor:
            with fabric.autocast():
                return classifier(pixel_values)  # (B, C)

        fisher, count = diagonal_fisher(forward, batches, params, estimator=self.fisher_estimator)
        norm = acc.add(tensors, {k: f.cpu() for k, f in fisher.items()})
        return {"num_examples": count, "fisher_norm": norm}

    def extra_report(self) -> dict[str, Any]:
        """Per model: images used, seconds, ``‖F‖₂`` and the normalised coefficient ``c_i``."""
        if not self.per_model:
            return {}
        norms = [entry["fisher_norm"] for entry in self.per_model.values()]
        coefficients = fisher_coefficients(
            norms, normalize=self.normalize_fisher_weight, minimal_fisher_weight=self.minimal_fisher_weight
        )
        return {
            NAME: {name: {**entry, "coefficient": c} for (name, entry), c in zip(self.per_model.items(), coefficients)}
        }
