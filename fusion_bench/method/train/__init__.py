"""Trainers that make experts: CLIP vision fine-tuning (full, LoRA, L-LoRA) and image-classifier fine-tuning."""
