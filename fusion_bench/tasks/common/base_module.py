"""``BaseConfig``: the hyperparameters of one image-classification fine-tuning run.

One flat dataclass shared by the processor (image size, augmentation), the metric logger
(number and names of classes, where figures go), the Lightning module (optimiser, schedule,
loss) and the data module (batch size, workers, validation split, seed). Every field is
checked when the config is built, so a bad value fails before any model is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fusion_bench.errors import ConfigError

__all__ = ["BaseConfig", "OPTIMIZERS", "SCHEDULERS", "config_from_mapping"]

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("cosine", "linear", "constant", "plateau")


def _check_number(name: str, value: Any, *, low: float, low_open: bool = False, high: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"BaseConfig: {name!r} must be a number {bound}; got {value!r}")


def _check_int(name: str, value: Any, *, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(
            f"BaseConfig: {name!r} must be an integer >= {low}{' or null' if optional else ''}; got {value!r}"
        )


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"BaseConfig: {name!r} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclass
class BaseConfig:
    """Hyperparameters of an image-classification fine-tuning run.

    Attributes:
        model_name: hub id or local ``save_pretrained`` folder of the model (and its image processor).
        num_classes: classes of the task; the model's head is replaced when its size differs
            (None: keep the checkpoint's head; the data module then checks the labels fit).
        class_names: names of the classes (None: from the dataset's ``ClassLabel``), used for
            ``id2label`` and the confusion-matrix figure; they set ``num_classes`` when it is None.
        learning_rate: peak learning rate.
        image_size: side of the (square) model input; None: the model's image processor's size.
        batch_size: training batch size.
        eval_batch_size: validation/test batch size (None: ``batch_size``).
        weight_decay: decoupled (AdamW) or L2 (Adam, SGD) weight decay.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (momentum 0.9).
        scheduler: ``cosine`` or ``linear`` decay to 0 over all steps, ``constant``, or
            ``plateau`` (ReduceLROnPlateau on ``monitor``, factor 0.1); all after a linear warm-up.
        warmup_steps: steps of linear warm-up from 0 (not with ``plateau``).
        label_smoothing: of the training cross-entropy (validation and test use none).
        seed: seeds the new head's initialisation, the data order and the validation split.
        num_workers: DataLoader workers.
        val_fraction: share of the training split held out for validation when the dataset
            has no validation split (0: no validation).
        random_resized_crop: training augmentation, ``RandomResizedCrop(scale=(s, 1))`` with
            ``s`` this value (None: off).
        horizontal_flip: training augmentation, random horizontal flips.
        color_jitter: training augmentation, brightness/contrast/saturation jitter of this
            strength (0: off).
        monitor / monitor_mode: the metric that early stopping, checkpointing and ``plateau``
            follow, and whether lower (``min``) or higher (``max``) is better.
        early_stopping_patience: epochs without improvement before stopping (None: never).
        checkpoint_dir: where ``ModelCheckpoint`` keeps the best ``save_top_k`` checkpoints
            (None: no checkpoints).
        save_top_k: how many checkpoints to keep.
        output_dir: where confusion-matrix figures go (None: ``<trainer.default_root_dir>/confusion_matrix``).
    """

    model_name: str = "google/vit-base-patch16-224"
    num_classes: int | None = None
    class_names: list[str] | None = None
    learning_rate: float = 1e-4
    image_size: int | None = None
    batch_size: int = 32
    eval_batch_size: int | None = None
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    seed: int = 42
    num_workers: int = 0
    val_fraction: float = 0.1
    random_resized_crop: float | None = None
    horizontal_flip: bool = False
    color_jitter: float = 0.0
    monitor: str = "val/loss"
    monitor_mode: str = "min"
    early_stopping_patience: int | None = None
    checkpoint_dir: str | None = None
    save_top_k: int = 1
    output_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError(f"BaseConfig: 'model_name' must be a hub id or a folder; got {self.model_name!r}")
        _check_int("num_classes", self.num_classes, low=1, optional=True)
        self._check_class_names()
        _check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_int("image_size", self.image_size, low=1, optional=True)
        _check_int("batch_size", self.batch_size, low=1)
        _check_int("eval_batch_size", self.eval_batch_size, low=1, optional=True)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_int("warmup_steps", self.warmup_steps, low=0)
        if self.scheduler == "plateau" and self.warmup_steps:
            raise ConfigError(
                "BaseConfig: 'warmup_steps' does not combine with scheduler 'plateau'; set warmup_steps=0"
            )
        _check_number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        _check_int("seed", self.seed, low=0)
        _check_int("num_workers", self.num_workers, low=0)
        _check_number("val_fraction", self.val_fraction, low=0.0, high=0.9)
        if self.random_resized_crop is not None:
            _check_number("random_resized_crop", self.random_resized_crop, low=0.0, low_open=True, high=1.0)
        if not isinstance(self.horizontal_flip, bool):
            raise ConfigError(f"BaseConfig: 'horizontal_flip' must be true or false; got {self.horizontal_flip!r}")
        _check_number("color_jitter", self.color_jitter, low=0.0, high=1.0)
        _check_choice("monitor_mode", self.monitor_mode, ("min", "max"))
        _check_int("early_stopping_patience", self.early_stopping_patience, low=1, optional=True)
        _check_int("save_top_k", self.save_top_k, low=1)

    def _check_class_names(self) -> None:
        if self.class_names is None:
            return
        names = list(self.class_names)
        if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"BaseConfig: 'class_names' must be distinct strings; got {names!r}")
        if self.num_classes is not None and len(names) != self.num_classes:
            raise ConfigError(f"BaseConfig: {len(names)} 'class_names' given for num_classes={self.num_classes}")
        self.class_names = names
        self.num_classes = len(names)

    @property
    def eval_batch(self) -> int:
        """The validation/test batch size."""
        return self.eval_batch_size or self.batch_size

    def replace(self, **changes: Any) -> "BaseConfig":
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (for ``save_hyperparameters`` and model cards)."""
        return dataclasses.asdict(self)


def config_from_mapping(options: Mapping[str, Any] | None, *, what: str, **fixed: Any) -> BaseConfig:
    """A :class:`BaseConfig` from a config mapping, rejecting unknown fields by name.

    Args:
        options: field -> value (None: all defaults).
        what: names the owner in messages (e.g. ``"image_classification_finetune: config"``).
        **fixed: fields set by the caller; giving them in ``options`` too is an error.

    Returns:
        the checked config.
    """
    options = dict(options or {})
    valid = [f.name for f in dataclasses.fields(BaseConfig)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(map(repr, unknown))}; valid fields: {', '.join(valid)}")
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise ConfigError(
            f"{what}: {', '.join(map(repr, clash))} cannot be set here (taken from the model pool / dataset)"
        )
    return BaseConfig(**options, **fixed)
