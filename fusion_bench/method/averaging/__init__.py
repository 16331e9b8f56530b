"""Averaging the fine-tuned models: simple (model soups) and weighted averages (no ``_pretrained_`` needed)."""
