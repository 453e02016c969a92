"""kvfix.eval: hallucination benchmarks (POPE, CHAIR, MME, AMBER) for kvfix-patched models.

`kvfix.eval.scoring` scores predictions from any source against the benchmarks' own files.
"""
