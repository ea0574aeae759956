"""Shared fixtures: settings on a temporary database, and the real server on port 0."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from service.backends.base import Backend
from service.backends.embedded import EmbeddedLlamaServer
from service.factory import create_app
from service.metrics import Metrics
from service.services import Services
from service.settings import Settings, load_settings

from .fakes import ScriptedBackend
from .pg import pg_url, postgres  # noqa: F401 (fixtures: a real PostgreSQL, tests/pg.py)

EMBEDDED_ALIAS = "tiny"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF model (needs the embedded extra; its tests skip without it)."""
    from service.tinymodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
async def llama(tiny_model: Path) -> AsyncIterator[EmbeddedLlamaServer]:
    """llama.cpp's real server on the tiny model, on a loopback port."""
    from service.backends.embedded import embedded_llama_server

    async with embedded_llama_server(tiny_model, alias=EMBEDDED_ALIAS) as server:
        yield server


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """In modules marked ``both_stores`` (the end-to-end ones), each test taking ``settings``
    runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if ("store_kind" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("both_stores") is not None):
        metafunc.parametrize("store_kind", ["sqlite", "postgres"])


@pytest.fixture
def store_kind() -> str:
    """The store ``settings`` names: SQLite, or with ``SERVICE_TEST_STORE=postgres`` PostgreSQL
    (every test then; modules marked ``both_stores`` run on both in any case)."""
    return os.environ.get("SERVICE_TEST_STORE", "sqlite")


@pytest.fixture
def settings(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> Settings:
    """Settings on a fresh store: a SQLite file, or a fresh database on the session's
    PostgreSQL (tests/pg.py)."""
    if store_kind == "postgres":
        return load_settings(db=request.getfixturevalue("pg_url"))
    return load_settings(db=tmp_path / "service.db")


@dataclass
class RunningServer:
    url: str
    services: Services

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)


@asynccontextmanager
async def running_server(
    settings: Settings, backend: Backend | None = None, *, from_settings: bool = False,
    **hypercorn: Any,
) -> AsyncIterator[RunningServer]:
    """The real app under hypercorn's trio worker on 127.0.0.1:0, shut down gracefully after.

    ``backend`` defaults to an in-memory scripted one; pass a real adapter (on the simulator)
    for end-to-end tests, or ``from_settings=True`` to let the lifespan build the backend the
    settings describe (adapters, interceptors recording into the server's store) as in production.
    """
    if from_settings:
        assert backend is None, "from_settings builds the backend; do not pass one"
    else:
        backend = backend or ScriptedBackend()
    app = create_app(settings, metrics=Metrics(), backend=backend)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 2
    config.accesslog = None
    for name, value in hypercorn.items():  # e.g. keep_alive_timeout=..., graceful_timeout=...
        setattr(config, name, value)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        try:
            yield RunningServer(binds[0], app.extensions["service"])
        finally:
            stop.set()


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with running_server(settings) as srv:
        yield srv
