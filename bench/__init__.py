"""The tsunagu-versus-coturn benchmark: ``python -m bench`` (see docs/BENCHMARKS.md)."""
