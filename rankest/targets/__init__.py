"""Targets: what produces the rows of the target matrix (the interface:
:mod:`rankest.targets.base`) — a neural teacher, n-gram counts, precomputed logits."""
