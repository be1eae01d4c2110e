"""Benchmarks of exem against an independent re-implementation of the published ExEM code."""
