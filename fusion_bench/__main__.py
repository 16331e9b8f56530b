from fusion_bench.scripts.cli import run

run()
