"""Alignment of models that do not share a base: specs of which tensor dimensions share one
permutation, and the solvers that choose those permutations (pure compute, no Ray)."""
