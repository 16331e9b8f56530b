"""Output ensembles: every expert runs on the input and their outputs are combined (mean, weighted sum, maximum).

Not merges: the result holds every expert (T times the parameters and the compute). They are the usual
upper reference row of merging tables. The combination acts on the encoder's outputs
(:mod:`fusion_bench.models.ensemble`).
"""
