"""Programs: what the CLI runs."""

from fusion_bench.program.fusion_program import FabricModelFusionProgram

__all__ = ["FabricModelFusionProgram"]
