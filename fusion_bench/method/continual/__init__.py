"""Continual (order-dependent) merging: the models arrive one at a time and are merged in that order.

``opcm`` (orthogonal projection-based continual merging) and the sequential baselines
``continual_task_arithmetic``, ``continual_ties_merging`` and ``continual_simple_average``. They share
:mod:`fusion_bench.method.continual.base`: the order option, the per-step evaluation and the plot.
"""
