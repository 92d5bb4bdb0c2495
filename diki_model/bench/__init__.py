"""Continual-learning benchmarks: the offline task stream and the paper's MTIL protocol."""
