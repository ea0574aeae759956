"""Model files the service can generate itself (a tiny random GGUF for tests and demos)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["write_tiny_model"]

if TYPE_CHECKING:
    from .tiny import write_tiny_model


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m service.models.tiny` does not import the module twice (runpy warns).
    if name == "write_tiny_model":
        from .tiny import write_tiny_model

        return write_tiny_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
