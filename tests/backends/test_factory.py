"""build_backend: settings to the backend the app uses."""

from __future__ import annotations

import pytest

from service.backends import (
    AutoBackend,
    Interceptor,
    OllamaBackend,
    OpenAICompatBackend,
    build_backend,
    client_from_settings,
)
from service.backends.embedded import slots_for
from service.errors import ConfigError
from service.metrics import Metrics
from service.settings import load_settings

from ..backend_helpers import FakeRecorder


@pytest.mark.parametrize(("kind", "cls"), [("ollama", OllamaBackend),
                                           ("llamacpp", OpenAICompatBackend)])
async def test_single_backends(kind: str, cls: type) -> None:
    settings = load_settings(backend=kind, llm_idle_timeout=7, llm_call_timeout=70,
                             llamacpp_url="http://127.0.0.1:9/")
    async with client_from_settings(settings) as client:
        backend = build_backend(settings, client)
        assert isinstance(backend, cls)
        assert backend.name == kind
        budgets = backend.budgets
        assert (budgets.first_chunk, budgets.gap, budgets.call) == (7, 7, 70)


async def test_auto_with_interceptors_and_embedded() -> None:
    settings = load_settings(backend="auto", health_ttl=3, backend_concurrency=5)
    async with client_from_settings(settings) as client:
        auto = build_backend(settings, client, recorder=FakeRecorder(), metrics=Metrics(),
                             embedded_url="http://127.0.0.1:5555")
        assert isinstance(auto, AutoBackend)
        assert auto.health_ttl == 3
        assert [b.name for b in auto.backends] == ["ollama", "llamacpp", "embedded"]
        assert all(isinstance(b, Interceptor) for b in auto.backends)
        assert auto.backends[0].limiter.total_tokens == 5
        assert auto.backends[2].url == "http://127.0.0.1:5555"


async def test_embedded_needs_its_url() -> None:
    # (A model file named: load_settings refuses embedded without one.)
    settings = load_settings(backend="embedded", gguf="models/tiny.gguf")
    async with client_from_settings(settings) as client:
        with pytest.raises(ConfigError, match="embedded"):
            build_backend(settings, client)
        backend = build_backend(settings, client, embedded_url="http://127.0.0.1:1234")
        # Limited to the server's slots (the calls past them wait in the service's queue):
        # two of 2,048 tokens for the default 4,096, not four of 1,024.
        assert isinstance(backend, Interceptor)
        assert backend.limiter.total_tokens == slots_for(settings.embedded_ctx) == 2
        assert isinstance(backend.inner, OpenAICompatBackend)
        assert backend.name == "embedded"


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://:80",
                                 "ftp://127.0.0.1", "127.0.0.1:8080"])
@pytest.mark.parametrize("variable", ["llamacpp_url", "ollama_url"])
def test_a_backend_url_that_is_not_one_stops_the_start(variable: str, url: str) -> None:
    # Found in review: a port that is not a number passed the settings; the service started,
    # then /readyz and /api/backends were 500s and every run an internal error.
    with pytest.raises(ConfigError, match=f"SERVICE_{variable.upper()}"):
        load_settings(db="/tmp/never-opened.db", **{variable: url})
