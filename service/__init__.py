"""A reliable LLM agent service on Trio."""

__all__ = ["__version__"]

__version__ = "0.1.0"
