"""Settings, read from ``SERVICE_*`` environment variables and validated at start-up.

A bad value stops the process with one line naming the variable (see ``service.__main__``);
``load_settings`` raises :class:`~service.errors.ConfigError` carrying that line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import httpx
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigError
from .text import redact_userinfo

__all__ = ["BackendKind", "Settings", "load_settings"]


class BackendKind(StrEnum):
    auto = "auto"
    ollama = "ollama"
    llamacpp = "llamacpp"
    embedded = "embedded"


def check_url(value: str) -> str:
    """An upstream's base URL, checked (``ValueError`` naming it, its password hidden): what
    an adapter can append its paths to. Used for the URL settings and a fleet file's ``url``."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {redact_userinfo(value)!r}")
    try:
        parts.port  # noqa: B018 (reading it validates it: "host:abc" or a port over 65535)
        # Reading the host decodes it (IDNA): "xn--" with no punycode was accepted here, and
        # then every call and probe raised IDNAError, a 500 with a traceback.
        httpx.URL(value).host  # noqa: B018
    except (ValueError, httpx.InvalidURL) as exc:  # IDNAError is a ValueError
        raise ValueError(f"not a valid URL: {redact_userinfo(value)!r} ({exc})") from None
    if "?" in value or "#" in value:  # (in the userinfo, the port check has refused it)
        # The adapters append their paths to it: "http://h#a/api/chat" (or "http://h?/...")
        # went to "/".
        raise ValueError(f"not a base URL (it has a {'query' if '?' in value else 'fragment'})"
                         f": {redact_userinfo(value)!r}")
    return value.rstrip("/")


_DEFAULT_DB = Path("./data/service.db")


def _path(value: object) -> object:
    """A path setting as given, with a leading ``~`` the user's home: no shell expands it in a
    systemd unit or an env file, and ``~/svc/service.db`` made a directory named "~" (which
    ``rm -rf ~`` then "cleans up")."""
    if isinstance(value, str | Path):
        try:
            return Path(value).expanduser()
        except RuntimeError as exc:  # "~nobody/...": no such user (or no home for "~")
            raise ValueError(f"{value}: {exc} (~ is expanded to a home directory)") from None
    return value


class Settings(BaseSettings):
    """Every setting of the service. Documented in README.md and ../shared/API.md."""

    # allow_inf_nan: every float setting is a finite number ("inf" seconds of drain held a
    # shutdown for as long as any run lasted; of run timeout, a run with no deadline).
    # env_ignore_empty: ``VAR=`` is how an env file, compose (``${X}`` unset) or a Helm value
    # leaves a setting unset: the default, as docs/operations.md says (an empty number, URL or
    # name was refused, exit 2, while an empty path or list was the default).
    model_config = SettingsConfigDict(env_prefix="SERVICE_", extra="ignore", frozen=True,
                                      allow_inf_nan=False, env_ignore_empty=True)

    # A SQLite file path (a Path), or a PostgreSQL URL (kept a str: a Path would fold its "//").
    db: Path | str = _DEFAULT_DB
    backend: BackendKind = BackendKind.auto
    gguf: Path | None = None
    # One URL or a comma-separated list of servers (service.backends.fleet).
    ollama_url: str = "http://127.0.0.1:11434"
    llamacpp_url: str = "http://127.0.0.1:8080"
    backends_file: Path | None = None  # a TOML fleet; replaces the two URL settings
    ollama_ca_bundle: Path | None = None  # PEM CAs for those servers' TLS certificates
    llamacpp_ca_bundle: Path | None = None
    default_model: str | None = None
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field((), repr=False)  # never in a log
    # Browser origins allowed besides the service's own (CORS); any other Origin gets 403.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    run_timeout: float = Field(300.0, gt=0)
    llm_idle_timeout: float = Field(60.0, gt=0)
    tool_timeout: float = Field(30.0, gt=0)
    max_runs: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    # Beyond API.md (documented in the README):
    # Ollama sends a tool call only once the model has written all of it (nothing streams
    # meanwhile): a request that offers it tools waits this long for a chunk instead.
    llm_tool_call_timeout: float = Field(180.0, gt=0)
    llm_connect_timeout: float = Field(10.0, gt=0)
    llm_call_timeout: float = Field(600.0, gt=0)
    backend_concurrency: int = Field(64, ge=1)
    # The embedded llama.cpp server: context (split between its slots: backends.embedded.
    # slots_for), answer cap (0: none).
    embedded_ctx: int = Field(4096, ge=256)
    embedded_max_tokens: int = Field(0, ge=0)
    # Ollama's context window for each request (its ``options.num_ctx``): unset, its own
    # default (2,048-4,096 tokens by version and memory), past which it drops the start of the
    # prompt (the system prompt and the tools first) without a word.
    ollama_num_ctx: int | None = Field(None, ge=256, le=16_777_216)
    # Seconds a call waits for one of those slots; then 503 backend_busy with Retry-After.
    backend_queue_timeout: float = Field(30.0, gt=0)
    health_ttl: float = Field(5.0, ge=0)
    # At least 0.1 s: SERVICE_SSE_KEEPALIVE=0.000001 was accepted, and one idle WebSocket then
    # kept a core busy with pings.
    sse_keepalive: float = Field(15.0, ge=0.1)
    shutdown_drain: float = Field(5.0, ge=0)
    history_chars: int = Field(24_000, ge=0)
    # Days the events of a finished run are kept (0: for ever); its messages always are.
    events_retention_days: float = Field(0.0, ge=0, le=36_500)
    db_synchronous: str = "NORMAL"
    # PostgreSQL: each statement's statement_timeout; a server that does not answer at all
    # (frozen, a network dropping packets) has its connection cut 5 s after it.
    db_timeout: float = Field(30.0, gt=0, le=3600)
    tools: Annotated[tuple[str, ...], NoDecode] = ()  # modules with a deployer's own tools
    log_level: str = "INFO"
    log_format: str = "json"

    @field_validator("db", mode="before")
    @classmethod
    def _store_location(cls, value: object) -> object:
        # A URL is not a path: "postgresql://..." became a directory "postgresql:" holding a
        # SQLite file, silently. (A scheme has two letters or more: "C:/data" stays a path.)
        if isinstance(value, str) and re.match(r"(?i)postgres(ql)?:(?!//)", value):
            # "postgresql:/user:pw@host/db", "postgresql:user:pw@...": a URL mistyped, not a
            # SQLite path (a directory named after the credentials, the password in the log).
            # Not echoed: it may hold the password.
            raise ValueError("not a SQLite path nor a postgresql://user:password@host:port/db "
                             "URL (a \"//\" is missing after the scheme)")
        if isinstance(value, str) and (url := re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/", value)):
            scheme = url[1].lower()
            if scheme in ("postgresql", "postgres") and value[url.end():].startswith("/"):
                return value  # the PostgreSQL store (libpq checks the rest when it connects)
            raise ValueError(f"not a SQLite path nor a postgresql:// URL but a {scheme}: URL")
        if isinstance(value, str) and value.strip().lower() in (":memory:", "file::memory:"):
            # Each of the store's connections would open a database of its own: the start
            # failed on "no such table", and nothing would outlive the process anyway.
            raise ValueError(":memory: is not supported: the store keeps conversations across "
                             "restarts and processes; give a file path (or a PostgreSQL URL)")
        if isinstance(value, str) and _LIBPQ_KEYWORDS.search(value):
            # "host=... password=..." became a SQLite file of that name (the password in its
            # name and in the log). Not echoed: it may hold the password.
            raise ValueError("a libpq keyword/value string is not supported: give a "
                             "postgresql://user:password@host:port/db URL (or a SQLite path)")
        if isinstance(value, str) and not value.strip():
            return _DEFAULT_DB  # SERVICE_DB= (an env file's unset): the default, not "."
        if isinstance(value, str) and value.endswith("/"):
            # "data/" made a SQLite file named "data".
            raise ValueError("a directory (it ends with /): name the database file in it, "
                             "e.g. data/service.db")
        return _path(value)

    @field_validator("gguf", "backends_file", "ollama_ca_bundle", "llamacpp_ca_bundle",
                     mode="before")
    @classmethod
    def _optional_path(cls, value: object) -> object:
        # ``VAR=`` is how an env file, compose (``${X}`` unset) or a Helm value leaves a
        # setting unset: Path("") was ".", the working directory (a store opened on a
        # directory, "model file not found: .").
        if isinstance(value, str) and not value.strip():
            return None
        return _path(value)

    @field_validator("ollama_url", "llamacpp_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return ",".join(check_url(u.strip()) for u in value.split(",") if u.strip()) or (
            check_url(value))

    @field_validator("llamacpp_url")
    @classmethod
    def _without_v1(cls, value: str) -> str:
        # OpenAI clients are configured with a base URL ending in /v1; the service adds it
        # itself (it was /v1/v1/...: ready, and every completion a 404).
        return ",".join(u[:-3] if u.endswith("/v1") else u for u in value.split(","))

    @field_validator("api_keys", "tools", "cors_origins", mode="before")
    @classmethod
    def _keys(cls, value: object) -> object:
        if isinstance(value, str):
            items = tuple(k.strip() for k in value.split(",") if k.strip())
            if value.strip() and not items:
                # "," or " , ": meant to hold something; for SERVICE_API_KEYS an empty list
                # silently turns authentication off. Empty means empty; this is a mistake.
                raise ValueError("holds only commas and spaces (leave it empty for none)")
            return items
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_chars(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            # A header carries ASCII; a key with other characters could never match. (Spaces
            # inside a key are sent as they are; those at its ends are trimmed on both sides.)
            if not (key.isascii() and key.isprintable()):
                raise ValueError("a key must be printable ASCII")
        return keys

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        from .origins import normal_origin

        for origin in origins:
            # A typo ("localhost:3000", a trailing path) would silently allow nothing.
            if normal_origin(origin) is None:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        return origins

    @field_validator("db_synchronous")
    @classmethod
    def _sync(cls, value: str) -> str:
        value = value.upper()
        if value not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError("must be OFF, NORMAL, FULL or EXTRA")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in ("json", "text"):
            raise ValueError("must be json or text")
        return value


def load_settings(**overrides: object) -> Settings:
    """Read the environment (overridden by ``overrides``), or raise ConfigError with one line."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        err["msg"] = err["msg"].removeprefix("Value error, ")  # pydantic's, before our text
        field = str(err["loc"][0]) if err["loc"] else "?"
        var = f"SERVICE_{field.upper()}"
        given = err.get("input")
        message = _redact(f"invalid setting {var}={given!r}: {err['msg']}")
        if field == "api_keys" or (isinstance(given, str) and (
                _LIBPQ_KEYWORDS.search(given) or (field == "db" and "@" in given))):
            # Never echoed: keys (a bad one is still a key), a libpq string or a database
            # URL however mistyped (its password).
            message = f"invalid setting {var}: {err['msg']}"
        raise ConfigError(message, variable=var) from None
    if settings.backend is BackendKind.embedded and settings.gguf is None:
        # Judged from the settings alone: refused before anything is made (the store).
        raise ConfigError("SERVICE_BACKEND=embedded needs SERVICE_GGUF (a .gguf model file)",
                          variable="SERVICE_GGUF")
    from .backends.fleet import validate_fleet  # the fleet file, CA bundles: ConfigError

    validate_fleet(settings)
    return settings


# SERVICE_* variables read by other parts than the service's settings (the terminal client, the
# test suite); any other unknown one is most likely a misspelt setting.
_OTHER_VARIABLES = frozenset({"SERVICE_CHAT_URL", "SERVICE_CHAT_KEY"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Lines naming each ``SERVICE_*`` variable in ``environ`` that no setting reads (a typo:
    ``SERVICE_API_KEY`` for ``SERVICE_API_KEYS`` served with no key at all), with the closest
    setting's name. Said, not refused: other software's variables may share the prefix (a
    Kubernetes Service named "service" sets ``SERVICE_PORT``)."""
    known = {f"SERVICE_{name.upper()}" for name in Settings.model_fields}
    lines = []
    for name in sorted(environ):
        if (not name.startswith("SERVICE_") or name in known or name in _OTHER_VARIABLES
                or name.startswith("SERVICE_TEST_")):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is not a setting of this service and is ignored{hint}")
    return lines


_LIBPQ_KEYWORDS = re.compile(r"(?:^|\s)(?:host|hostaddr|port|dbname|user|password|sslmode)\s*=")


def _redact(text: str) -> str:
    """URL credentials in ``text`` ("http://user:pass@host" -> "http://***@host", whatever the
    password holds, and a bare token before "@" too): start-up errors go to stderr and from
    there to system logs."""
    return redact_userinfo(text)


def embedded_alias(settings: Settings) -> str | None:
    """The name the embedded model is served under: ``SERVICE_DEFAULT_MODEL`` when it is the one
    backend, else the GGUF file's stem (under auto the default model is meant for the others)."""
    if settings.gguf is None:
        return None
    if settings.backend is BackendKind.embedded and settings.default_model:
        return settings.default_model
    return settings.gguf.stem
