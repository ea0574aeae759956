"""The tiny random GGUF model the service writes itself, for tests, demos and benchmarks.

``python -m service.tinymodel OUT.gguf`` writes one.
"""

from .tiny import write_tiny_model

__all__ = ["write_tiny_model"]
