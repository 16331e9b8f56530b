"""``ClassificationMetricLogger``: accuracy, macro F1 / precision / recall and the confusion matrix.

Computed with ``torchmetrics`` per stage (``train``, ``val``, ``test``), accumulated over an
epoch and logged once at its end as ``<stage>/accuracy``, ``<stage>/f1``,
``<stage>/precision``, ``<stage>/recall``; the confusion matrix (rows: true class, columns:
predicted class, counts) is kept in :attr:`ClassificationMetricLogger.history` and saved as
a PNG figure ``<output_dir>/<stage>_epoch<NNN>.png``.

Conventions (those of ``torchmetrics`` and scikit-learn): accuracy is top-1 over all
samples; the macro average is the unweighted mean over the classes that occur among the
targets or the predictions of the epoch (a class absent from both is left out); a class
never predicted has precision 0, a class never present has recall 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.tasks.common.base_module import BaseConfig
from fusion_bench.utils.io import atomic_write

__all__ = ["ClassificationMetricLogger", "STAGES", "SCALAR_METRICS", "plot_confusion_matrix"]

STAGES = ("train", "val", "test")
SCALAR_METRICS = ("accuracy", "f1", "precision", "recall")


def _metric_collection(num_classes: int) -> nn.Module:
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
        }
    )


class ClassificationMetricLogger(nn.Module):
    """Per-stage classification metrics (see module docstring).

    Args:
        config: gives ``num_classes`` (required), ``class_names`` (figure labels) and
            ``output_dir`` (where figures go).
    """

    def __init__(self, config: BaseConfig) -> None:
        super().__init__()
        if config.num_classes is None:
            raise ConfigError("ClassificationMetricLogger: set BaseConfig.num_classes (the number of classes)")
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = config.num_classes
        self.class_names = list(config.class_names or [str(i) for i in range(self.num_classes)])
        self.output_dir = config.output_dir
        self.scalars = nn.ModuleDict({f"{s}_metrics": _metric_collection(self.num_classes) for s in STAGES})
        self.confusion = nn.ModuleDict({f"{s}_confusion": MulticlassConfusionMatrix(self.num_classes) for s in STAGES})
        self.history: dict[str, list[dict[str, Any]]] = {s: [] for s in STAGES}
        self.figures: list[Path] = []

    def _check_stage(self, stage: str) -> None:
        if stage not in STAGES:
            raise ConfigError(f"ClassificationMetricLogger: unknown stage {stage!r}; stages: {', '.join(STAGES)}")

    @torch.no_grad()
    def update(self, stage: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``logits`` (B, C) or predicted classes (B,), ``labels`` (B,)."""
        self._check_stage(stage)
        preds = logits.argmax(dim=-1) if logits.ndim == 2 else logits
        self.scalars[f"{stage}_metrics"].update(preds, labels)
        self.confusion[f"{stage}_confusion"].update(preds, labels)

    def has_updates(self, stage: str) -> bool:
        """Whether ``stage`` saw a batch since its last reset."""
        return bool(self.confusion[f"{stage}_confusion"].update_count)

    def compute(self, stage: str) -> dict[str, Any]:
        """The stage's metrics so far: the four scalars (floats) and ``confusion_matrix`` (list of rows)."""
        self._check_stage(stage)
        values = {k: float(v) for k, v in self.scalars[f"{stage}_metrics"].compute().items()}
        values["confusion_matrix"] = self.confusion[f"{stage}_confusion"].compute().long().tolist()
        return values

    def reset(self, stage: str) -> None:
        """Forget the stage's batches."""
        self.scalars[f"{stage}_metrics"].reset()
        self.confusion[f"{stage}_confusion"].reset()

    def log_epoch(
        self, module: Any, stage: str, *, epoch: int, figure_dir: str | Path | None = None
    ) -> dict[str, Any] | None:
        """Log the epoch's scalars through ``module.log_dict``, save its confusion-matrix figure, reset.

        Args:
            module: the ``LightningModule`` logging them (None: do not log).
            stage: ``train``, ``val`` or ``test``.
            epoch: the epoch number (in the record and the figure's name).
            figure_dir: where the figure goes when the config's ``output_dir`` is None (None: no figure).

        Returns:
            the epoch's record (``epoch`` plus :meth:`compute`'s values), or None when the
            stage saw no batch.
        """
        if not self.has_updates(stage):
            return None
        record = {"epoch": epoch, **self.compute(stage)}
        if module is not None:
            module.log_dict({f"{stage}/{k}": record[k] for k in SCALAR_METRICS}, sync_dist=True)
        directory = self.output_dir or figure_dir
        if directory is not None:
            path = Path(directory) / f"{stage}_epoch{epoch:03d}.png"
            self.figures.append(
                plot_confusion_matrix(
                    path, record["confusion_matrix"], self.class_names, title=f"{stage} confusion matrix, epoch {epoch}"
                )
            )
        self.history[stage].append(record)
        self.reset(stage)
        return record


def plot_confusion_matrix(
    path: str | Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str], *, title: str
) -> Path:
    """Save a confusion matrix (rows: true, columns: predicted) as an annotated PNG (Agg, atomic).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.tensor(matrix, dtype=torch.long)  # (C, C)
    n = len(class_names)
    side = 2.0 + 0.45 * n
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(counts.numpy(), cmap="Blues", vmin=0)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:  # counts stay legible
        peak = max(int(counts.max()), 1)
        for (i, j), value in zip(
            torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(), counts.flatten().tolist()
        ):
            ax.text(
                j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > peak / 2 else "black"
            )
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return Path(path)
