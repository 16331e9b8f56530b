"""The Lightning callbacks of a fine-tuning run, from its :class:`BaseConfig`.

* ``ModelCheckpoint`` (when ``checkpoint_dir`` is set): keeps the ``save_top_k`` best
  checkpoints by ``monitor`` (plus ``last.ckpt``), written by Lightning to a temporary file
  and renamed;
* ``EarlyStopping`` (when ``early_stopping_patience`` is set): stops after that many
  epochs without improvement of ``monitor``;
* ``LearningRateMonitor`` (when asked; it needs a logger): logs the scheduled learning rate
  every step. The schedule itself is the ``lr_scheduler`` of ``configure_optimizers``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint

from fusion_bench.tasks.common.base_module import BaseConfig

__all__ = ["build_callbacks", "best_checkpoint"]


def build_callbacks(config: BaseConfig, *, learning_rate_monitor: bool = False) -> list[Callback]:
    """The callbacks the config asks for (see module docstring).

    Args:
        config: ``checkpoint_dir``, ``save_top_k``, ``early_stopping_patience``, ``monitor``, ``monitor_mode``.
        learning_rate_monitor: add a ``LearningRateMonitor`` (the trainer must have a logger).

    Returns:
        the callbacks, for ``lightning.Trainer(callbacks=...)``.
    """
    callbacks: list[Callback] = []
    if config.checkpoint_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=config.checkpoint_dir,
                filename="epoch{epoch:03d}-step{step}",
                auto_insert_metric_name=False,
                monitor=config.monitor,
                mode=config.monitor_mode,
                save_top_k=config.save_top_k,
                save_last=True,
            )
        )
    if config.early_stopping_patience is not None:
        callbacks.append(
            EarlyStopping(monitor=config.monitor, mode=config.monitor_mode, patience=config.early_stopping_patience)
        )
    if learning_rate_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def best_checkpoint(callbacks: list[Callback]) -> str | None:
    """The best checkpoint's path recorded by a ``ModelCheckpoint`` among ``callbacks`` (None: none)."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            return callback.best_model_path
    return None
