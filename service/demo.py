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
# The tiny model never stops on its own (it writes until max_tokens or a full context), and
# every agent's prompt must fit a slot with a history: 8,192 tokens for each of the 4 slots
# (16 MB of KV cache for this model), answers cut at 256 tokens. Their settings override these.
DEMO_CTX = 4 * 8192
DEMO_MAX_TOKENS = 256


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
    try:
        model = Path(os.environ.get("SERVICE_GGUF") or DEMO_MODEL).expanduser()
    except RuntimeError as exc:  # "~nobody/...": no such user
        raise ConfigError(f"SERVICE_GGUF: {exc} (~ is expanded to a home directory)",
                          variable="SERVICE_GGUF") from None
    ensure_tiny_model(model)
    overrides: dict[str, object] = {
        "backend": "embedded", "gguf": model,
        "default_model": os.environ.get("SERVICE_DEFAULT_MODEL") or "tiny"}
    # Unless set (then the settings read and check them as usual); set empty is unset, as
    # for every setting (``VAR=``: an env file's unset).
    if not os.environ.get("SERVICE_EMBEDDED_CTX"):
        overrides["embedded_ctx"] = DEMO_CTX
    if not os.environ.get("SERVICE_EMBEDDED_MAX_TOKENS"):
        overrides["embedded_max_tokens"] = DEMO_MAX_TOKENS
    return overrides
