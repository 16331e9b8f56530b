"""Merging with training data: Fisher merging, RegMean, RegMean++ (``base``: the shared data-merge framework)."""
