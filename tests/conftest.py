"""Shared fixtures: settings on a temporary database, and the real server on port 0
(``tests/servers.py``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.backends.embedded import EmbeddedLlamaServer
from service.settings import Settings, load_settings

from .pg import db, pg_url, postgres  # noqa: F401 (fixtures: a real PostgreSQL, tests/pg.py)
from .servers import EMBEDDED_ALIAS, RunningServer, running_server


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


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with running_server(settings) as srv:
        yield srv
