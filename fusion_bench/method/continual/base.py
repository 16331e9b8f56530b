"""What the continual merging methods share: the merge order, the step loop, per-step evaluation, the plot.

A continual method sees the fine-tuned models one at a time, in an order (``task_order``, or the pool's
order shuffled with ``seed`` when ``shuffle_order``), and after each model holds a merged model. Its
arithmetic is a generator over state dicts (``steps(base, models)``: one merged state dict per model
merged), so the same code serves the algorithm and the exact-value tests. The algorithm reads one model
at a time (θ0, the running merge and the newest model are in memory, whatever the number of tasks).

With ``evaluate_on_every_step`` (the default, as the reference) the task pool given by the program
(``method.taskpool``) evaluates the merged model after every step; the report's ``continual`` entry lists,
per step, the models merged so far, every task's accuracy and loss, the average over the tasks merged so
far (``seen``, the curve the OPCM paper plots) and the average over all tasks of the pool. ``plot_path``
writes that curve as a figure (matplotlib, imported only then).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench.errors import ConfigError, IncompatibleModelsError
from fusion_bench.merge.cores import upcast_floats
from fusion_bench.merge.streaming import check_finite, validate_pool
from fusion_bench.method._options import check_bool, check_int
from fusion_bench.method.base_algorithm import BaseAlgorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.utils.io import atomic_write, check_output_path

__all__ = [
    "StateDict",
    "merge_order",
    "ModelLayout",
    "model_layout",
    "seen_average",
    "plot_continual_curve",
    "ContinualMergeAlgorithm",
]

log = logging.getLogger(__name__)

StateDict = Mapping[str, Tensor]


def merge_order(
    method: str,
    names: Sequence[str],
    *,
    task_order: Sequence[str] | None,
    shuffle_order: bool,
    seed: int | None,
) -> list[str]:
    """The order the models are merged in.

    Args:
        method: the method's name (messages).
        names: the pool's fine-tuned models, in pool order.
        task_order: an explicit order (every model of the pool exactly once); when given, no shuffle.
        shuffle_order: shuffle the pool's order.
        seed: the shuffle's seed: ``random.Random(seed).shuffle`` (the order the reference draws after
            seeding Python's generator with the same seed); None: Python's global generator (seeded by
            the run's ``seed``).

    Raises:
        ConfigError: ``task_order`` names an unknown model, repeats one or leaves one out.
    """
    if task_order is not None:
        order = [str(n) for n in task_order]
        unknown = [n for n in order if n not in names]
        if unknown:
            raise ConfigError(
                f"{method}: option 'task_order' names {unknown[0]!r}, not a model of the pool {list(names)}"
            )
        repeated = sorted({n for n in order if order.count(n) > 1})
        if repeated:
            raise ConfigError(f"{method}: option 'task_order' lists {repeated[0]!r} more than once")
        missing = [n for n in names if n not in order]
        if missing:
            raise ConfigError(f"{method}: option 'task_order' leaves out {missing} (list every model of the pool)")
        return order
    order = list(names)
    if shuffle_order:
        (random if seed is None else random.Random(seed)).shuffle(order)
    return order


@dataclass(frozen=True)
class ModelLayout:
    """Which tensors of a model play which role (canonical keys of the pool).

    Attributes:
        linear: the weights of ``nn.Linear`` modules.
        non_leaf: parameters held directly by a module that has children (CLIP's ``class_embedding``).
    """

    linear: frozenset[str]
    non_leaf: frozenset[str]


def model_layout(model: nn.Module, state_dict: StateDict) -> ModelLayout:
    """The :class:`ModelLayout` of ``model``; ``state_dict`` is the pool's canonical state dict of ``model``
    (sharing its storage), so keys are matched by storage, whatever prefix the canonical names drop."""
    by_pointer = {t.data_ptr(): k for k, t in state_dict.items()}
    linear, non_leaf = set(), set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.data_ptr() in by_pointer:
            linear.add(by_pointer[module.weight.data_ptr()])
        if any(True for _ in module.children()):
            non_leaf.update(
                by_pointer[p.data_ptr()] for p in module.parameters(recurse=False) if p.data_ptr() in by_pointer
            )
    return ModelLayout(frozenset(linear), frozenset(non_leaf))


def _is_metrics(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("accuracy"), (int, float))


def seen_average(report: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, float] | None:
    """The unweighted mean of each metric over ``tasks`` that ``report`` evaluated (None if none)."""
    rows = [report[t] for t in tasks if _is_metrics(report.get(t))]
    if not rows:
        return None
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows)]
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in keys}


def plot_continual_curve(path: str | Path, steps: Sequence[Mapping[str, Any]], *, title: str) -> Path:
    """Average accuracy (%) vs number of tasks merged, over the tasks merged so far and over all tasks.

    Args:
        path: the figure file (format from its suffix; written atomically).
        steps: the ``continual["steps"]`` entries of the report.
        title: the figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = [s["num_merged"] for s in steps]
    for key, label, style in (("seen", "tasks merged so far", "o-"), ("all", "all tasks", "s--")):
        y = [100 * s[key]["accuracy"] if s.get(key) else float("nan") for s in steps]
        ax.plot(x, y, style, label=label)
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("average accuracy (%)")
    ax.set_xticks(x)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    suffix = Path(path).suffix.lstrip(".").lower() or "png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=suffix, dpi=120)
    return Path(path)


PLOT_FORMATS = ("png", "pdf", "svg")


class ContinualMergeAlgorithm(BaseAlgorithm):
    """Base of the continual methods (see the module docstring).

    Args:
        shuffle_order: merge the pool's models in a shuffled order (the reference's default).
        seed: the shuffle's seed (None: Python's generator, seeded by the run's ``seed``).
        task_order: an explicit order, every model once (then nothing is shuffled).
        evaluate_on_every_step: evaluate the merged model with the run's task pool after every step.
        plot_path: write the average accuracy vs number of tasks merged there (``.png``, ``.pdf``, ``.svg``).
    """

    needs_base: bool = True  # whether ``steps`` needs θ0

    def __init__(
        self,
        *,
        shuffle_order: bool = True,
        seed: int | None = None,
        task_order: Sequence[str] | None = None,
        evaluate_on_every_step: bool = True,
        plot_path: str | None = None,
    ) -> None:
        self.shuffle_order = check_bool(self.name, "shuffle_order", shuffle_order)
        self.seed = None if seed is None else check_int(self.name, "seed", seed)
        if task_order is not None and (isinstance(task_order, (str, bytes)) or not hasattr(task_order, "__iter__")):
            raise ConfigError(f"{self.name}: option 'task_order' must be a list of model names; got {task_order!r}")
        self.task_order = None if task_order is None else [str(n) for n in task_order]
        self.evaluate_on_every_step = check_bool(self.name, "evaluate_on_every_step", evaluate_on_every_step)
        self.plot_path = None
        if plot_path is not None:
            suffix = Path(str(plot_path)).suffix.lstrip(".").lower()
            if suffix not in PLOT_FORMATS:
                raise ConfigError(
                    f"{self.name}: option 'plot_path' must end in {', '.join('.' + f for f in PLOT_FORMATS)}; "
                    f"got {plot_path!r}"
                )
            if not self.evaluate_on_every_step:
                raise ConfigError(f"{self.name}: option 'plot_path' needs evaluate_on_every_step=true")
            self.plot_path = str(check_output_path(plot_path, option="method.plot_path"))
        self._report: dict[str, Any] = {}

    # ---- what a method defines ----------------------------------------------------------------
    def steps(
        self, base: dict[str, Tensor] | None, models: Iterable[dict[str, Tensor]], *, layout: ModelLayout
    ) -> Iterator[dict[str, Tensor]]:
        """Yield the merged floating tensors after each model of ``models`` (θ0 is ``base``)."""
        raise NotImplementedError

    # ---- the run ---------------------------------------------------------------------------------
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        names, _ = validate_pool(modelpool, min_models=1, with_base=self.needs_base)
        order = merge_order(
            self.name, names, task_order=self.task_order, shuffle_order=self.shuffle_order, seed=self.seed
        )
        taskpool = self._step_taskpool(order)
        log.info("%s: merging in the order %s", self.name, order)
        model = modelpool.load_model(PRETRAINED if self.needs_base else order[0])
        own = modelpool.canonical_state_dict(model)
        layout = model_layout(model, own)
        base = self._floats(PRETRAINED, own) if self.needs_base else None
        models = (self._read(modelpool, name, own) for name in order)
        steps: list[dict[str, Any]] = []
        progress = tqdm(self.steps(base, models, layout=layout), total=len(order), desc=self.name)
        for index, merged in enumerate(progress):
            own = modelpool.canonical_state_dict(model)  # again: an evaluation may have moved the model
            with torch.no_grad():
                for key, value in merged.items():
                    own[key].copy_(value.to(own[key].dtype))
            entry: dict[str, Any] = {"num_merged": index + 1, "merged": order[: index + 1]}
            if taskpool is not None:
                entry.update(self._evaluate(taskpool, model, order[: index + 1]))
            steps.append(entry)
        self._report = {"continual": {"method": self.name, "order": order, "steps": steps}}
        if self.plot_path is not None:
            title = f"{self.name}: " + " → ".join(order)
            plot_continual_curve(self.plot_path, steps, title=title if len(title) < 90 else f"{self.name}")
        return model

    def extra_report(self) -> dict[str, Any]:
        """``{"continual": {"method", "order", "steps": [...]}}`` after ``run``."""
        return dict(self._report)

    def _step_taskpool(self, order: Sequence[str]) -> Any:
        """The task pool evaluating each step, or None (checked before any merge)."""
        taskpool = getattr(self, "taskpool", None)
        if not self.evaluate_on_every_step:
            return None
        tasks = getattr(taskpool, "task_names", None)
        if taskpool is None or tasks is None:
            if self.plot_path is not None:
                raise ConfigError(
                    f"{self.name}: option 'plot_path' needs a task pool that evaluates tasks "
                    f"(got {type(taskpool).__name__ if taskpool is not None else 'none'})"
                )
            log.warning("%s: no task pool with tasks; the steps are not evaluated", self.name)
            return None
        if self.plot_path is not None and not set(order) & set(tasks):
            raise ConfigError(
                f"{self.name}: none of the models {list(order)} is a task of the task pool {list(tasks)}; "
                f"the accuracy over the tasks merged so far (plot_path) is undefined"
            )
        return taskpool

    @staticmethod
    def _evaluate(taskpool: Any, model: nn.Module, merged: Sequence[str]) -> dict[str, Any]:
        report = taskpool.evaluate(model)
        tasks = {k: dict(v) for k, v in report.items() if k not in ("average", "model_info") and _is_metrics(v)}
        return {"tasks": tasks, "seen": seen_average(report, merged), "all": report.get("average")}

    @staticmethod
    def _floats(name: str, state_dict: StateDict) -> dict[str, Tensor]:
        for key, tensor in state_dict.items():
            check_finite(name, key, tensor)
        return upcast_floats(state_dict)

    def _read(self, modelpool: BaseModelPool, name: str, reference: StateDict) -> dict[str, Tensor]:
        """Model ``name``'s floating tensors (upcast copies); its other tensors must equal the buffer's."""
        state_dict = modelpool.canonical_state_dict(modelpool.load_model(name))
        for key, tensor in state_dict.items():
            if not tensor.is_floating_point() and not torch.equal(tensor, reference[key].to(tensor.device)):
                raise IncompatibleModelsError(f"model {name!r}, non-float tensor {key!r} differs from the base")
        return self._floats(name, state_dict)
