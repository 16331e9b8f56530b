"""``clip_regmean``: RegMean (regression mean) merging of CLIP vision encoders.

Jin et al., *Dataless Knowledge Fusion by Merging Weights of Language Models*, ICLR 2023.
https://arxiv.org/abs/2212.09849

Each linear layer ``y = W x`` is merged as the solution of ``min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²``
over the models' own inputs ``X_i``: ``W* = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ`` with ``G_i = X_iᵀ X_i / n``.
Steps (the reference defaults behind the published tables; docs/algorithms.md):

1. For each fine-tuned model i, in pool order: forward hooks on every ``nn.Linear`` of the vision
   encoder (``q/k/v/out_proj``, ``fc1``, ``fc2``; not the patch convolution) collect ``G_i``, the mean of
   ``xxᵀ`` over every token of the first ``num_regmean_examples = 256`` images of its task's train
   split (unshuffled, ``dataloader_kwargs.batch_size = 32``; labels unused).
2. ``G̃_i``: off-diagonal entries × ``reduce_non_diagonal_ratio = 0.95`` (the paper's α), diagonal kept.
3. ``W* = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ`` (solved in float64, not inverted); every other tensor (biases,
   layer norms, embeddings) is the mean of the fine-tuned models; tensors matching
   ``exclude_param_names_regex`` keep their pre-trained values.

Memory: models are read one at a time; the merge keeps only ``Σ G̃_i`` and ``Σ G̃_i W_iᵀ`` per linear
layer and ``Σ θ_i`` of the other tensors (:class:`RegMeanAccumulator`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fusion_bench.errors import DatasetError, IncompatibleModelsError
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.method.data.base import PairedSums, PerModelDataMerge, canonical_parameter_names, merge_all
from fusion_bench.method._options import check_range
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.models.linear_grams import LinearInputGrams, linear_modules, reduce_off_diagonal

__all__ = ["solve_regmean", "RegMeanAccumulator", "regmean", "linear_inputs", "RegMeanAlgorithmForCLIP"]

NAME = "clip_regmean"
StateDict = Mapping[str, torch.Tensor]


def solve_regmean(key: str, gram_sum: torch.Tensor, gram_weight_sum: torch.Tensor) -> torch.Tensor:
    """``W* = ((Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ)ᵀ`` in float64 (Cholesky, else LU; never an explicit inverse).

    Args:
        key: the weight's name (for the message).
        gram_sum: ``Σ G̃_i``, ``(in, in)``.
        gram_weight_sum: ``Σ G̃_i W_iᵀ``, ``(in, out)``.

    Returns:
        ``(out, in)`` float32.

    Raises:
        DatasetError: ``Σ G̃_i`` is singular (some input feature is zero on every token).
    """
    gram, rhs = gram_sum.double(), gram_weight_sum.double()
    factor, info = torch.linalg.cholesky_ex(gram)  # Σ G̃ is symmetric PSD: Cholesky when it is definite
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor).T.float().contiguous()
    try:  # not numerically definite: LU
        solution = torch.linalg.solve(gram, rhs)  # (in, out)
    except torch.linalg.LinAlgError:
        raise DatasetError(
            f"{NAME}: the summed Gram matrix of {key!r} is singular (an input feature is zero on every token); "
            f"use more examples (num_regmean_examples) or exclude it with exclude_param_names_regex"
        ) from None
    return solution.T.float().contiguous()


class RegMeanAccumulator(PairedSums):
    """What the RegMean merge needs, summed over the models added in order: per linear weight
    ``Σ G̃_i`` and ``Σ G̃_i W_iᵀ`` (:attr:`sums`), and the mean of every other tensor.

    Args:
        reduce_non_diagonal_ratio: α, the factor of the Gram matrices' off-diagonal entries.
    """

    def __init__(self, *, reduce_non_diagonal_ratio: float = 0.95) -> None:
        super().__init__()
        self.ratio = reduce_non_diagonal_ratio

    def add(self, params: StateDict, grams: StateDict) -> None:
        """Fold in one model's float tensors and its Gram matrices (keyed by the linear weights' keys)."""
        for key, gram in grams.items():
            reduced = reduce_off_diagonal(gram.float(), self.ratio)  # (in, in)
            self.add_pair(key, reduced, reduced @ params[key].float().T)  # (in, out)
        self.others.add({k: v for k, v in params.items() if k not in grams})

    def combine(self, key: str, gram_sum: torch.Tensor, gram_weight_sum: torch.Tensor) -> torch.Tensor:
        return solve_regmean(key, gram_sum, gram_weight_sum)


def regmean(
    params: Sequence[StateDict], grams: Sequence[StateDict], *, reduce_non_diagonal_ratio: float = 0.95
) -> dict[str, torch.Tensor]:
    """RegMean over whole state dicts (the pure core).

    Args:
        params: the models' float tensors.
        grams: each model's ``{linear weight key: G_i}``; those weights are solved, the rest averaged.
        reduce_non_diagonal_ratio: α.

    Returns:
        the merged tensors.
    """
    return merge_all(RegMeanAccumulator(reduce_non_diagonal_ratio=reduce_non_diagonal_ratio), params, grams)


def linear_inputs(model: nn.Module, keys: Mapping[str, str], merged: Mapping[str, Any]) -> dict[str, nn.Module]:
    """The ``nn.Linear`` modules of ``model`` whose weight's canonical key (``keys``: parameter name
    -> key) is in ``merged``, by module name."""
    return {name: m for name, m in linear_modules(model).items() if keys.get(f"{name}.weight") in merged}


@register_algorithm(NAME)
class RegMeanAlgorithmForCLIP(PerModelDataMerge):
    """RegMean over a CLIP pool's fine-tuned vision encoders (see module docstring).

    Args:
        exclude_param_names_regex: regexes (``re.match`` on canonical keys) of tensors that keep
            their pre-trained values.
        num_regmean_examples: images of each task's train split used.
        reduce_non_diagonal_ratio: α, the factor of the Gram matrices' off-diagonal entries.
        dataloader_kwargs: ``batch_size``, ``num_workers``, ``shuffle`` (false: the first images).
        seed: seeds the subset when ``dataloader_kwargs.shuffle``.
        checkpoint_path: file saved after each model; a rerun resumes from it (null: none).
    """

    def __init__(
        self,
        *,
        exclude_param_names_regex: Sequence[str] = (),
        num_regmean_examples: int = 256,
        reduce_non_diagonal_ratio: float = 0.95,
        dataloader_kwargs: Mapping[str, Any] | None = None,
        seed: int = 42,
        checkpoint_path: str | None = None,
    ) -> None:
        self._init_data_options(
            num_examples=("num_regmean_examples", num_regmean_examples),
            dataloader_kwargs=dataloader_kwargs,
            exclude_param_names_regex=exclude_param_names_regex,
            seed=seed,
            checkpoint_path=checkpoint_path,
        )
        self.num_regmean_examples = self._num_examples
        self.reduce_non_diagonal_ratio = check_range(
            self.name, "reduce_non_diagonal_ratio", reduce_non_diagonal_ratio, low=0.0, high=1.0
        )

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "reduce_non_diagonal_ratio": self.reduce_non_diagonal_ratio}

    def _new_accumulator(self) -> RegMeanAccumulator:
        return RegMeanAccumulator(reduce_non_diagonal_ratio=self.reduce_non_diagonal_ratio)

    @torch.no_grad()
    def _add_model(
        self, acc: RegMeanAccumulator, name: str, model: nn.Module, batches: Any, fabric: Any, data: CLIPTaskClassifiers
    ) -> dict[str, Any]:
        tensors = self.model_tensors(data.modelpool, name, model)
        keys = canonical_parameter_names(data.modelpool, model)
        modules = linear_inputs(model, keys, tensors)
        if not modules:
            raise IncompatibleModelsError(
                f"{self.name}: model {name!r} has no nn.Linear layer to merge (all excluded?)"
            )
        model = fabric.to_device(model)
        count = 0
        with LinearInputGrams(modules) as hooks:
            for pixel_values in batches:
                with fabric.autocast():
                    model(pixel_values=pixel_values)
                count += pixel_values.shape[0]
        grams = {keys[f"{m}.weight"]: g.cpu() for m, g in hooks.grams().items()}
        acc.add(tensors, grams)
        return {"num_examples": count, "num_tokens": next(iter(hooks.rows.values()))}
