"""Benchmarks (``python -m service.bench``): measured and written down, never asserted in tests."""

__all__: list[str] = []
