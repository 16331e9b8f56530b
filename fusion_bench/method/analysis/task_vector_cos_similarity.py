"""Pairwise cosine similarity of the task vectors (an analysis; returns θ0).

Reference: FusionBench ``TaskVectorCosSimilarity`` (``config/method/analysis/
task_vector_cos_similarity.yaml``): each τ_i flattened over the model, in float64;
``cos(τ_i, τ_j) = τ_i·τ_j / (‖τ_i‖ ‖τ_j‖)``. Here the dot products are accumulated key by key
(float64), so only one key's tensors are ever held. The matrix is written as a CSV at
``save_to_csv`` (model names as header and index; written atomically) with a heatmap PNG beside
it (``<csv stem>.png``, if ``plot_heatmap``), and returned by :meth:`extra_report`. ``run``
returns the pre-trained model, so a task pool evaluates θ0. A zero task vector gives NaN.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from fusion_bench.method.task_vector.core import PoolTaskVectors, plan_pool
from fusion_bench.method._options import check_bool
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils.io import atomic_write

__all__ = [
    "accumulate_gram",
    "cosine_similarity_matrix",
    "write_similarity_csv",
    "plot_similarity_heatmap",
    "TaskVectorCosSimilarityAlgorithm",
]

log = logging.getLogger(__name__)


def cosine_similarity_matrix(gram: torch.Tensor) -> torch.Tensor:
    """Cosines from a Gram matrix of dot products: ``G_ij / sqrt(G_ii G_jj)`` (``(T, T)``, float64).

    ``sqrt(G_ii · G_ii)`` rounds back to ``G_ii``, so the diagonal is exactly 1 (NaN for a zero vector).
    """
    squares = gram.diagonal()  # (T,) squared norms
    return gram / torch.sqrt(squares[:, None] * squares[None, :])


def accumulate_gram(by_key: Iterable[tuple[str, list[torch.Tensor]]], num_tasks: int) -> torch.Tensor:
    """``G_ij = Σ_keys τ_i[key]·τ_j[key]`` in float64 from ``(key, [τ_t])`` pairs, one key at a time."""
    gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for _, tvs in by_key:
        x = torch.stack([tv.to(torch.float64).flatten() for tv in tvs])  # (T, n)
        gram += x @ x.T
    return gram


def write_similarity_csv(path: str | Path, names: Sequence[str], matrix: torch.Tensor) -> Path:
    """Write ``matrix`` as CSV (``names`` as header and index; float repr round-trips) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", *names])
    for name, row in zip(names, matrix.tolist()):
        writer.writerow([name, *(repr(float(v)) for v in row)])
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(buffer.getvalue())
    return Path(path)


def plot_similarity_heatmap(path: str | Path, names: Sequence[str], matrix: torch.Tensor) -> Path:
    """Save an annotated heatmap of ``matrix`` as PNG at ``path`` (Agg backend, atomic)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = 1.0 + 0.6 * len(names)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix.numpy(), cmap="GnBu", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    for i, row in enumerate(matrix.tolist()):
        for j, value in enumerate(row):
            color = "white" if abs(value) > 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_title("Cosine similarity of task vectors")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return Path(path)


@register_algorithm("task_vector_cos_similarity")
class TaskVectorCosSimilarityAlgorithm(BaseAlgorithm):
    """Cosine similarity of task vectors; returns θ0 (see the module docstring).

    Args:
        save_to_csv: where to write the matrix as CSV (the heatmap goes beside it); null: none.
        plot_heatmap: also write ``<csv stem>.png``.
    """

    def __init__(self, save_to_csv: str | None = None, plot_heatmap: bool = True) -> None:
        self.save_to_csv = None if save_to_csv is None else str(save_to_csv)
        self.plot_heatmap = check_bool("task_vector_cos_similarity", "plot_heatmap", plot_heatmap)
        self._report: dict[str, Any] = {}

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        plan = plan_pool(modelpool, min_models=2)
        gram = accumulate_gram(PoolTaskVectors(modelpool, plan).by_key(), len(plan.names))
        matrix = cosine_similarity_matrix(gram)
        names = list(plan.names)
        log.info("cosine similarity of task vectors (%s):\n%s", ", ".join(names), matrix)
        self._report = {"task_vector_cos_similarity": {"models": names, "matrix": matrix.tolist()}}
        if self.save_to_csv is not None:
            csv_path = write_similarity_csv(self.save_to_csv, names, matrix)
            if self.plot_heatmap:
                plot_similarity_heatmap(csv_path.with_suffix(".png"), names, matrix)
        return modelpool.load_pretrained_model()

    def extra_report(self) -> dict[str, Any]:
        """``{"task_vector_cos_similarity": {"models": [...], "matrix": [[...]]}}`` after ``run``."""
        return dict(self._report)
