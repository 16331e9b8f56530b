"""``python -m fusion_bench.webui``: the same as ``fusion_bench_webui``."""

from fusion_bench.webui.server import main

main()
