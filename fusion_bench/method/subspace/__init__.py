"""Subspace merges built on SVDs and least squares: TSV-M, Iso-C / Iso-CTS, WUDI, Model Stock (``svd``: shared SVD tools)."""
