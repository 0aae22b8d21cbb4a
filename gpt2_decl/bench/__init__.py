"""Benchmarks: timing the model (forward passes, decoding) against the machine's limits."""
