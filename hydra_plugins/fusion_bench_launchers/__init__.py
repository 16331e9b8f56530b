"""FusionBench's Hydra launchers for sweeps on clusters (``hydra/launcher=slurm``, ``hydra/launcher=ray``).

Both wait for every job of a sweep, keep the reports of the jobs that finished, and when a job
failed print one ``fusion_bench: error: ...`` line per failed job (its overrides, why, and the
path of its log) and exit with status 1. Hydra finds them by scanning the ``hydra_plugins``
namespace package; nothing heavy is imported until a launcher runs.
"""
