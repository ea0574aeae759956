"""``python -m service --demo``: a first look with nothing else installed.

Writes the tiny local model (``./models/tiny.gguf``) if it is absent and serves it on the embedded
llama.cpp backend. Its text is gibberish (random weights), but tokenizing, templating, streaming,
cancellation and timings are real.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

__all__ = ["DEMO_MODEL", "demo_overrides"]

DEMO_MODEL = Path("models/tiny.gguf")


def demo_overrides() -> dict[str, object]:
    try:
        from .backends.embedded import ensure_tiny_model
    except ImportError as exc:  # pragma: no cover - the module itself imports nothing optional
        raise ConfigError(str(exc)) from exc
    try:
        import gguf  # noqa: F401  (only to give a clear message when the extra is missing)
        import xllamacpp  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--demo needs the embedded extra: pip install -e '.[embedded]'"
        ) from None
    model = Path(os.environ.get("SERVICE_GGUF", DEMO_MODEL))
    ensure_tiny_model(model)
    return {"backend": "embedded", "gguf": model,
            "default_model": os.environ.get("SERVICE_DEFAULT_MODEL", "tiny")}
