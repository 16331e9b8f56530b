"""Trainers that make experts: CLIP vision fine-tuning (full, LoRA, L-LoRA; one task or all tasks jointly) and image-classifier fine-tuning."""
