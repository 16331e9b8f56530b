"""Cheap health signals of a second-design mini CLIP build (``build_mini_clip --design v2``).

    python -m fusion_bench.scripts.mini_clip_signals --build DIR [--pairs scenes+signs ...] [--json OUT]

Measures, in one process and without the fusion program (seconds, not minutes):

* zero-shot accuracy of the pre-trained model on each task, and each expert on its own task;
* task arithmetic (λ 0.3) and TIES merging (top 20%, λ 0.3) of all experts, and simple averaging;
* pairwise task arithmetic ("do two experts add up?"): two experts merged at λ 0.5 and 1.0,
  each measured on both tasks;
* a linear probe (logistic regression) on the pre-trained image features that predicts which
  task an image comes from;
* the mean pairwise cosine of each task's zero-shot head rows (near 1: the text tower does not
  tell the class names apart);
* each expert alone at λ 0.3 on its own task: how much of its gain a fraction of the task vector
  keeps (the real benchmark's experts keep most of it, which is why a λ of 0.3 works there);
* the routing bound: each task with its own expert's MLPs over the task-arithmetic merge (λ 0.3) of
  everything else, what weight-ensembling MoE reaches with a perfect router;
* the Spearman correlation, per test image, between the prediction entropy and the cross-entropy
  loss of the task-arithmetic merge: what the test-time methods (AdaMerging, WEMoE) rely on when they
  minimise entropy instead of the loss;
* the share of the task-arithmetic merge's predictions that go to its most predicted class, per task
  (the labels are balanced: near 1/classes is healthy; much more means the other experts' vectors push
  the task's images towards one class);
* with ``--routing-steps N``, weight-ensembling MoE with a perfect router: per task, one MLP weight per
  layer and expert, trained for N steps on that task's own test images by entropy (what WEMoE
  minimises) and by the labels (an upper bound). Where entropy ends far below the labels although the
  task is known, the objective, not the router, is what holds WEMoE back.

The merges here are plain re-implementations for a quick look; the benchmark's table is made
by the library's methods (``benchmarks/mini_clip_table.py``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fusion_bench.data.mini_tasks import v2
from fusion_bench.data.mini_tasks.domains import DOMAINS

__all__ = ["MiniClipSignals", "measure_signals", "task_arithmetic", "ties", "with_expert_mlps"]

State = dict[str, torch.Tensor]


class MiniClipSignals:
    """A loaded build: the pre-trained CLIP, the experts' vision weights and the tasks' test images."""

    def __init__(self, build_dir: str | Path, *, n_test: int = 500, n_probe: int = 200, data_seed: int = 0) -> None:
        from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

        build_dir = Path(build_dir)
        self.model = CLIPModel.from_pretrained(str(build_dir / "clip-mini")).eval()
        self.processor = CLIPProcessor.from_pretrained(str(build_dir / "clip-mini"))
        self.tasks = [t for t in v2.TASKS_V2 if (build_dir / f"clip-mini_{t}").is_dir()]
        self.pretrained: State = {k: v.clone() for k, v in self.model.vision_model.state_dict().items()}
        self.experts: dict[str, State] = {}
        for task in self.tasks:
            expert = CLIPVisionModel.from_pretrained(str(build_dir / f"clip-mini_{task}"))
            weights = {k.removeprefix("vision_model."): v.clone() for k, v in expert.state_dict().items()}
            self.experts[task] = {k: weights[k] for k in self.pretrained}
        self.test = {t: v2.sample_task_images(t, "test", n_test, data_seed) for t in v2.TASKS_V2}
        self.probe_train = {t: v2.sample_task_images(t, "train", n_probe, data_seed)[0] for t in v2.TASKS_V2}
        self.heads = {t: self._head(t) for t in v2.TASKS_V2}
        self._test_pixels: dict[str, torch.Tensor] = {}
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        from fusion_bench.scripts.build_mini_clip import _pixel_values

        return _pixel_values(images, self.processor.image_processor)

    @torch.no_grad()
    def _head(self, task: str) -> torch.Tensor:
        """The zero-shot head: per class, the normalised mean of its normalised prompt embeddings."""
        domain = DOMAINS[task]
        rows = []
        for name in domain.classnames:
            text = self.processor.tokenizer(
                [t.format(name) for t in domain.templates], padding=True, return_tensors="pt"
            )
            embeds = F.normalize(self.model.text_projection(self.model.text_model(**text).pooler_output), dim=-1)
            rows.append(F.normalize(embeds.mean(0), dim=-1))
        return torch.stack(rows)

    def head_cosine(self, task: str) -> float:
        """Mean pairwise cosine of ``task``'s head rows."""
        head = self.heads[task]
        k = len(head)
        return float(((head @ head.T).sum() - k) / (k * (k - 1)))

    @torch.no_grad()
    def features(self, state: State, images: np.ndarray) -> torch.Tensor:
        """Pooled (pre-projection) image features under the vision weights ``state``."""
        self.model.vision_model.load_state_dict(state)
        return self.model.vision_model(pixel_values=self._pixels(images)).pooler_output

    def accuracy(self, state: State, task: str) -> float:
        """Zero-shot-head accuracy (%) of the vision weights ``state`` on ``task``'s test images."""
        return float((self.logits(state, task).argmax(1).numpy() == self.test[task][1]).mean() * 100)

    @torch.no_grad()
    def logits(self, state: State, task: str) -> torch.Tensor:
        """Zero-shot logits (the model's logit scale) of the vision weights ``state`` on ``task``'s test images."""
        return self._differentiable_logits(state, task, slice(None))

    def top_class_share(self, state: State, task: str) -> float:
        """Share (%) of ``task``'s test images that ``state`` assigns to its most predicted class."""
        counts = np.bincount(self.logits(state, task).argmax(1).numpy(), minlength=len(self.heads[task]))
        return float(counts.max() / counts.sum() * 100)

    def _differentiable_logits(self, state: State, task: str, index: torch.Tensor | slice) -> torch.Tensor:
        """:meth:`logits` of the test images ``index``, differentiable with respect to ``state`` (the test
        images' pixel values are prepared once per task)."""
        from torch.func import functional_call

        if task not in self._test_pixels:
            self._test_pixels[task] = self._pixels(self.test[task][0])
        out = functional_call(self.model.vision_model, state, (), {"pixel_values": self._test_pixels[task][index]})
        embeds = F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)
        return self.model.logit_scale.exp() * embeds @ self.heads[task].T

    def routed_mlps(
        self, task: str, objective: str, steps: int, *, lr: float = 1e-2, batch_size: int = 16, seed: int = 0
    ) -> tuple[float, torch.Tensor]:
        """Weight-ensembling MoE with a perfect router, for ``task`` alone.

        The task-arithmetic merge (λ 0.3) of every expert, each layer's MLP replaced by
        ``θ0 + Σ_i w[layer, i] τ_i`` (θ0 pre-trained, τ_i the experts' task vectors; ``w`` from 0.3, so
        step 0 is the merge itself); ``w`` is trained for ``steps`` Adam steps of ``batch_size`` of
        ``task``'s test images by ``objective``: ``"entropy"`` (the mean prediction entropy, what WEMoE's
        routers minimise) or ``"labels"`` (the cross-entropy).

        Returns:
            ``(accuracy (%) on the task's test images, the trained weights (layers, experts))``.
        """
        if objective not in ("entropy", "labels"):
            raise ValueError(f"objective must be 'entropy' or 'labels', not {objective!r}")
        from fusion_bench.method.task_vector.lines import layer_index, num_layers

        merged = task_arithmetic(self.pretrained, self.experts, 0.3)
        layer_of = {k: layer_index(k) for k in merged if ".mlp." in k}
        vectors = {k: torch.stack([e[k] - self.pretrained[k] for e in self.experts.values()]) for k in layer_of}
        weights = torch.full((num_layers(layer_of), len(self.experts)), 0.3, requires_grad=True)

        def state() -> State:
            routed = {
                k: self.pretrained[k] + torch.tensordot(weights[layer], vectors[k], dims=1)
                for k, layer in layer_of.items()
            }
            return {**merged, **routed}

        optimizer = torch.optim.Adam([weights], lr=lr)
        generator = torch.Generator().manual_seed(seed)
        labels = torch.as_tensor(self.test[task][1])
        for _ in range(steps):
            index = torch.randint(0, len(labels), (batch_size,), generator=generator)
            logits = self._differentiable_logits(state(), task, index)
            if objective == "entropy":
                log_p = logits.log_softmax(-1)
                loss = -(log_p.exp() * log_p).sum(-1).mean()
            else:
                loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            final = state()
        return self.accuracy(final, task), weights.detach()

    def entropy_loss_spearman(self, state: State, task: str) -> float:
        """Spearman correlation over ``task``'s test images of prediction entropy and cross-entropy loss."""
        from scipy.stats import spearmanr

        log_p = self.logits(state, task).log_softmax(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        loss = -log_p[torch.arange(len(log_p)), torch.as_tensor(self.test[task][1])]
        return float(spearmanr(entropy.numpy(), loss.numpy())[0])

    def evaluate(self, state: State, tasks: Sequence[str] | None = None) -> dict[str, float]:
        """Accuracy on each of ``tasks`` (default: the experts' tasks) and their average (``"avg"``)."""
        tasks = list(tasks or self.tasks)
        result = {t: self.accuracy(state, t) for t in tasks}
        result["avg"] = float(np.mean([result[t] for t in tasks]))
        return result

    def task_probe(self) -> float:
        """Accuracy (%) of a linear probe on pre-trained features predicting an image's task."""
        from sklearn.linear_model import LogisticRegression

        train = [self.features(self.pretrained, self.probe_train[t]).numpy() for t in v2.TASKS_V2]
        test = [self.features(self.pretrained, self.test[t][0]).numpy() for t in v2.TASKS_V2]
        y_train = np.concatenate([np.full(len(x), i) for i, x in enumerate(train)])
        y_test = np.concatenate([np.full(len(x), i) for i, x in enumerate(test)])
        probe = LogisticRegression(max_iter=3000).fit(np.concatenate(train), y_train)
        return float(probe.score(np.concatenate(test), y_test) * 100)


def task_arithmetic(pretrained: State, experts: Mapping[str, State], scaling: float) -> State:
    """``θ0 + λ Σ_t (θ_t − θ0)``."""
    return {
        k: v + scaling * sum(e[k] - v for e in experts.values()) if v.is_floating_point() else v
        for k, v in pretrained.items()
    }


def with_expert_mlps(merged: State, expert: State) -> State:
    """``merged`` with every MLP tensor (``.mlp.`` in its name) taken from ``expert``."""
    return {k: expert[k] if ".mlp." in k else v for k, v in merged.items()}


def ties(pretrained: State, experts: Mapping[str, State], scaling: float = 0.3, keep: float = 0.2) -> State:
    """TIES merging: keep each task vector's top ``keep`` entries by magnitude, elect signs by the
    sum, average the agreeing entries, add ``scaling`` times that to ``θ0``."""
    merged: State = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            merged[key] = base
            continue
        vectors = torch.stack([(e[key] - base).flatten() for e in experts.values()])
        k = max(1, int(vectors.shape[1] * keep))
        threshold = vectors.abs().kthvalue(vectors.shape[1] - k + 1, dim=1, keepdim=True).values
        trimmed = vectors * (vectors.abs() >= threshold)
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        mean = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        merged[key] = base + scaling * mean.view_as(base)
    return merged


def _with_average(values: dict[str, float]) -> dict[str, float]:
    return {**values, "avg": float(np.mean(list(values.values())))} if values else {}


def measure_signals(
    signals: MiniClipSignals, pairs: Sequence[tuple[str, str]] = (), routing_steps: int = 0
) -> dict[str, Any]:
    """Every signal of the module docstring, as a JSON-able dict (accuracies in %); the perfect-router
    MLP weights only with ``routing_steps > 0``."""
    s = signals
    result: dict[str, Any] = {"tasks": s.tasks, "head_cosine": {t: round(s.head_cosine(t), 4) for t in v2.TASKS_V2}}
    result["pretrained"] = s.evaluate(s.pretrained, v2.TASKS_V2)
    result["experts"] = _with_average({t: s.accuracy(s.experts[t], t) for t in s.tasks})
    result["single_expert_0.3"] = _with_average(
        {t: s.accuracy(task_arithmetic(s.pretrained, {t: s.experts[t]}, 0.3), t) for t in s.tasks}
    )
    if len(s.tasks) > 1:
        merged = task_arithmetic(s.pretrained, s.experts, 0.3)
        result["simple_average"] = s.evaluate(task_arithmetic(s.pretrained, s.experts, 1.0 / len(s.tasks)))
        result["task_arithmetic_0.3"] = s.evaluate(merged)
        result["ties_0.3"] = s.evaluate(ties(s.pretrained, s.experts, 0.3))
        result["routing_bound"] = _with_average(
            {t: s.accuracy(with_expert_mlps(merged, s.experts[t]), t) for t in s.tasks}
        )
        result["entropy_loss_spearman"] = _with_average({t: s.entropy_loss_spearman(merged, t) for t in s.tasks})
        result["top_class_share_ta"] = {t: round(s.top_class_share(merged, t), 1) for t in s.tasks}
        if routing_steps > 0:
            for objective in ("entropy", "labels"):
                result[f"routed_mlps_{objective}"] = _with_average(
                    {t: s.routed_mlps(t, objective, routing_steps)[0] for t in s.tasks}
                )
    result["pairs"] = {}
    for a, b in pairs:
        two = {a: s.experts[a], b: s.experts[b]}
        result["pairs"][f"{a}+{b}"] = {
            str(lam): s.evaluate(task_arithmetic(s.pretrained, two, lam), [a, b]) for lam in (0.5, 1.0)
        }
    result["task_probe"] = s.task_probe()
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m fusion_bench.scripts.mini_clip_signals", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--build", required=True, help="a build_mini_clip --design v2 output folder")
    parser.add_argument("--pairs", nargs="*", default=[], help="task pairs as a+b")
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--json", default=None, help="also write the signals here")
    parser.add_argument(
        "--routing-steps", type=int, default=0, help="steps of the perfect-router MLP weights (0: not measured)"
    )
    args = parser.parse_args(argv)
    if args.routing_steps < 0:
        parser.error(f"--routing-steps must be >= 0, not {args.routing_steps}")
    pairs = [tuple(p.split("+")) for p in args.pairs]
    signals = MiniClipSignals(args.build, n_test=args.n_test)
    result = measure_signals(signals, pairs, routing_steps=args.routing_steps)  # type: ignore[arg-type]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
