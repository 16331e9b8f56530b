"""Upscaling: the experts are kept inside a larger model (a mixture of experts) instead of merged into one."""
