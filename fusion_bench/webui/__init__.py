"""``fusion_bench_webui``: a local web page to compose a ``fusion_bench`` run, watch it, and compare results.

Modules: :mod:`.configs` (the config tree, options and their comments), :mod:`.runs` (the run
queue), :mod:`.results` (reports through :mod:`fusion_bench.reporting`), :mod:`.app` (the
Starlette routes), :mod:`.server` (the command). Heavy libraries (Hydra, torch) are imported only
when a request needs them, so the server is ready fast.
"""

__all__: list[str] = []
