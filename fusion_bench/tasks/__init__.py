"""Training tasks: the Lightning image-classification framework that produces fine-tuned models.

``fusion_bench.tasks.classification`` (ViT / ResNet fine-tuning) and
``fusion_bench.tasks.common`` (:class:`~fusion_bench.tasks.common.base_module.BaseConfig`).
"""
