"""Test-time methods: AdaMerging, Concrete subspace, Weight-Ensembling MoE.

``base`` holds the resumable test-time training loop; ``clip_heads`` the zero-shot CLIP heads and
data loading they (and the data-based methods) share.
"""
