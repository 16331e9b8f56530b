"""FusionBench: deep model fusion — merge fine-tuned models and evaluate them on every task.

Layers (imports point down): ``program`` -> ``method`` -> ``modelpool`` / ``taskpool`` ->
``models`` -> ``data`` / ``utils``.
"""

__version__ = "0.3.0.dev0"

__all__ = ["__version__"]
