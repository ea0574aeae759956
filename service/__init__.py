"""A reliable LLM agent service on Trio."""

__all__ = ["__version__"]

# The one place the version is written: pyproject.toml reads it (dynamic), /openapi.json and
# `python -m service --version` show it.
__version__ = "0.1.0"
