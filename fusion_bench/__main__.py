from fusion_bench.scripts.cli import main

main()
