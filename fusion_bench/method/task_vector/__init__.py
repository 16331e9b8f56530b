"""The task-vector family: ``θ0 + λ · aggregate(sparsify(τ_t))``.

``core`` holds the family's engine (pool plans, task-vector views, the streamed and in-memory
merge); each member module (task arithmetic, TIES, DARE, Model Breadcrumbs, consensus, PCB,
LiNeS) holds all of its own math.
"""
