"""Hydra configs shipped with FusionBench (a package so Hydra can find them when installed)."""
