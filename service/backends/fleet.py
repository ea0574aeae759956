"""The servers the service talks to: from the URL settings or a fleet file, validated at start.

A fleet is a list of :class:`ServerSpec`. It comes from ``SERVICE_BACKENDS_FILE`` (TOML) when
that is set, else from ``SERVICE_OLLAMA_URL`` / ``SERVICE_LLAMACPP_URL`` (each one URL or a
comma-separated list) as ``SERVICE_BACKEND`` selects them. The file::

    [[server]]
    name = "gpu-a"                      # unique; shown in /api/backends, metrics, the call table
    kind = "llamacpp"                   # "llamacpp" (any OpenAI-compatible server) or "ollama"
    url = "https://gpu-a.lan:8080"
    weight = 2                          # its share of the load (in flight / weight is compared)
    max_concurrency = 8                 # calls at once (default SERVICE_BACKEND_CONCURRENCY)
    priority = 0                        # lower first; equal priorities share the load
    models = ["qwen2.5:7b"]             # what it serves (default: asked from the server)
    headers = { Authorization = "Bearer ..." }   # sent upstream, never shown
    tls = { ca_bundle = "ca.pem", client_cert = "c.pem", client_key = "k.pem", verify = true }
    timeouts = { connect = 5, idle = 60, call = 600 }   # seconds (default: the LLM settings)
    n_predict = 512                     # llama.cpp only: its --n-predict, the most an answer
                                        # gets (default: not known, a quarter of a slot)

Anything wrong (a missing name, an unknown key, a URL that is not one, a CA bundle that does not
load) is one :class:`ConfigError` line naming the server and the field. Values of ``headers``
are never part of a message or a ``repr``.
"""

from __future__ import annotations

import logging
import re
import ssl
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import certifi
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from ..settings import check_url
from ..text import redact_userinfo

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["ServerSpec", "TLSSpec", "fleet_from_settings", "split_urls", "tls_context"]

log = logging.getLogger(__name__)

Kind = Literal["ollama", "llamacpp"]


@dataclass(frozen=True, slots=True)
class TLSSpec:
    ca_bundle: Path | None = None  # PEM CAs signing its certificate (instead of the system's)
    client_cert: Path | None = None  # mutual TLS: our certificate (PEM) ...
    client_key: Path | None = None  # ... and its key (default: in client_cert)
    verify: bool = True  # False only when said so; logged as a warning at start

    @property
    def custom(self) -> bool:
        return self.ca_bundle is not None or self.client_cert is not None or not self.verify


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    kind: Kind
    url: str
    weight: float = 1.0
    max_concurrency: int | None = None
    priority: int = 0
    models: tuple[str, ...] = ()  # empty: asked from the server
    tls: TLSSpec = field(default_factory=TLSSpec)
    # Sent with every request to this server (a gateway's bearer token): never shown.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    call_timeout: float | None = None
    # A llama.cpp server's own cap on an answer (its ``--n-predict``), which its ``/props``
    # does not tell: the room a stored conversation's history leaves it (backends/room.py).
    n_predict: int | None = None
    # An Ollama server's context window, sent with each request (``options.num_ctx``).
    num_ctx: int | None = None


# -- the file ---------------------------------------------------------------------------------


class _TLSIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as the settings
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    verify: bool = True


class _TimeoutsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as the settings
    connect: float | None = Field(default=None, gt=0)
    idle: float | None = Field(default=None, gt=0)
    call: float | None = Field(default=None, gt=0)


class _ServerIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as the settings
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    kind: Literal["ollama", "llamacpp", "openai"]
    url: str
    weight: float = Field(default=1.0, gt=0, le=1000)
    max_concurrency: int | None = Field(default=None, ge=1)
    priority: int = 0
    models: list[str] = []
    headers: dict[str, str] = {}
    tls: _TLSIn = _TLSIn()
    timeouts: _TimeoutsIn = _TimeoutsIn()
    n_predict: int | None = Field(default=None, ge=1)
    num_ctx: int | None = Field(default=None, ge=256, le=16_777_216)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", key):
                raise ValueError(f"{key!r} is not a header name")
            if not (text.isascii() and text.isprintable()):
                # The value is a secret: named, never echoed.
                raise ValueError(f"the value of {key!r} must be printable ASCII")
        return value


class _FleetIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as the settings
    server: list[_ServerIn] = Field(min_length=1)


def _redact(text: str) -> str:
    return redact_userinfo(text)


def _without_v1(url: str) -> str:
    # OpenAI clients are configured with a base URL ending in /v1; the adapter adds it itself.
    return url[:-3] if url.endswith("/v1") else url


def split_urls(value: str) -> list[str]:
    """One URL or a comma-separated list, each checked (``ValueError`` naming the bad one)."""
    items = [u.strip() for u in value.split(",") if u.strip()]
    if not items:
        raise ValueError("no URL")
    return [check_url(u) for u in items]


def load_fleet_file(path: Path, *, base: Path | None = None) -> list[ServerSpec]:
    """The servers of a fleet file, or ConfigError with one line saying what is wrong."""
    where = f"SERVICE_BACKENDS_FILE: {path}"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}",
                          variable="SERVICE_BACKENDS_FILE") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not TOML: {exc}", variable="SERVICE_BACKENDS_FILE") from None
    try:
        fleet = _FleetIn.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        what = "the file"
        if len(loc) >= 2 and loc[0] == "server" and isinstance(loc[1], int):
            entry = raw.get("server", [])[loc[1]] if isinstance(raw.get("server"), list) else {}
            name = entry.get("name") if isinstance(entry, dict) else None
            what = f"server {loc[1] + 1}" + (f" ({name!r})" if isinstance(name, str) else "")
            loc = loc[2:]
        if loc and loc[0] == "headers" and len(loc) > 1:
            loc = loc[:2]  # a header's name, never its value
        field_name = ".".join(str(p) for p in loc) or "server"
        text = err["msg"].removeprefix("Value error, ")  # pydantic's, before our text
        message = text if field_name.startswith("headers") else _redact(text)
        raise ConfigError(f"{where}: {what}: {field_name}: {message}",
                          variable="SERVICE_BACKENDS_FILE") from None
    base = base if base is not None else path.parent
    specs: list[ServerSpec] = []
    seen: set[str] = set()
    for i, s in enumerate(fleet.server):
        if s.name in seen:
            raise ConfigError(f"{where}: server {i + 1}: name {s.name!r} is used twice",
                              variable="SERVICE_BACKENDS_FILE")
        seen.add(s.name)
        kind: Kind = "ollama" if s.kind == "ollama" else "llamacpp"
        if kind == "ollama" and s.n_predict is not None:
            # Ollama's cap is a request's (options.num_predict), and nothing here reads it.
            raise ConfigError(f"{where}: server {i + 1} ({s.name!r}): n_predict: for a "
                              "llama.cpp server only (its --n-predict)",
                              variable="SERVICE_BACKENDS_FILE")
        if kind == "llamacpp" and s.num_ctx is not None:
            # A llama.cpp server's context is its own (-c), not a request's.
            raise ConfigError(f"{where}: server {i + 1} ({s.name!r}): num_ctx: for an Ollama "
                              "server only (a llama.cpp server's context is its -c)",
                              variable="SERVICE_BACKENDS_FILE")

        def rel(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else base / p)

        tls = TLSSpec(rel(s.tls.ca_bundle), rel(s.tls.client_cert), rel(s.tls.client_key),
                      s.tls.verify)
        if tls.client_key is not None and tls.client_cert is None:
            raise ConfigError(f"{where}: server {i + 1} ({s.name!r}): tls.client_key without "
                              "tls.client_cert", variable="SERVICE_BACKENDS_FILE")
        spec = ServerSpec(
            name=s.name, kind=kind, url=_without_v1(s.url) if kind == "llamacpp" else s.url,
            weight=s.weight, max_concurrency=s.max_concurrency, priority=s.priority,
            models=tuple(s.models), tls=tls, headers=tuple(s.headers.items()),
            connect_timeout=s.timeouts.connect, idle_timeout=s.timeouts.idle,
            call_timeout=s.timeouts.call, n_predict=s.n_predict, num_ctx=s.num_ctx,
        )
        try:
            tls_context(spec.tls)
        except ConfigError as exc:
            raise ConfigError(f"{where}: server {i + 1} ({s.name!r}): {exc.message}",
                              variable="SERVICE_BACKENDS_FILE") from None
        specs.append(spec)
    return specs


# -- from the settings ------------------------------------------------------------------------


def fleet_from_settings(settings: Settings) -> list[ServerSpec]:
    """The servers the settings describe (embedded excluded: it has its own URL at start).

    From the URL lists, a kind's one server keeps the kind's name ("ollama"), several are
    "ollama-1", "ollama-2", ...; under ``auto`` Ollama's servers come before llama.cpp's
    (priority 0 and 1), as the single servers always did. The kind's CA bundle setting applies.
    """
    if settings.backends_file is not None:
        # SERVICE_OLLAMA_NUM_CTX is the default of the file's Ollama servers (each may say its
        # own): dropped, Ollama's small default cut their prompts without a word.
        return [replace(s, num_ctx=settings.ollama_num_ctx)
                if s.kind == "ollama" and s.num_ctx is None else s
                for s in load_fleet_file(settings.backends_file)]
    kind = str(getattr(settings.backend, "value", settings.backend))
    specs: list[ServerSpec] = []
    sources: list[tuple[Kind, str, Path | None]] = []
    if kind in ("auto", "ollama"):
        sources.append(("ollama", settings.ollama_url, settings.ollama_ca_bundle))
    if kind in ("auto", "llamacpp"):
        sources.append(("llamacpp", settings.llamacpp_url, settings.llamacpp_ca_bundle))
    for priority, (k, value, ca) in enumerate(sources):
        urls = split_urls(value)
        for i, url in enumerate(urls):
            name = k if len(urls) == 1 else f"{k}-{i + 1}"
            specs.append(ServerSpec(
                name=name, kind=k, url=_without_v1(url) if k == "llamacpp" else url,
                priority=priority, tls=TLSSpec(ca_bundle=ca),
                num_ctx=settings.ollama_num_ctx if k == "ollama" else None))
    return specs


def validate_fleet(settings: Settings) -> None:
    """ConfigError (one line) if the fleet the settings describe cannot be used."""
    for var, ca in (("SERVICE_OLLAMA_CA_BUNDLE", settings.ollama_ca_bundle),
                    ("SERVICE_LLAMACPP_CA_BUNDLE", settings.llamacpp_ca_bundle)):
        if ca is not None:
            try:
                tls_context(TLSSpec(ca_bundle=ca))
            except ConfigError as exc:
                raise ConfigError(f"invalid setting {var}: {exc.message}", variable=var) from None
    specs = fleet_from_settings(settings)
    kind = settings.backend.value
    if (settings.backends_file is not None and kind in ("ollama", "llamacpp")
            and not any(s.kind == kind for s in specs)):
        # As build_backend would, but before the store is opened: exit 2, one line.
        raise ConfigError(f"SERVICE_BACKEND={kind}: SERVICE_BACKENDS_FILE lists no {kind} "
                          "server", variable="SERVICE_BACKENDS_FILE")


# -- TLS --------------------------------------------------------------------------------------


class _Encrypted(Exception):
    """A key asked for a passphrase."""


def _no_passphrase() -> str:
    raise _Encrypted


def tls_context(tls: TLSSpec) -> ssl.SSLContext | None:
    """The SSL context for a server's own client; None when the shared client's default (the
    system's CAs via certifi, verified) is what it needs. ConfigError if a file does not load."""
    if not tls.custom:
        return None
    try:
        if tls.ca_bundle is not None:
            ctx = ssl.create_default_context(cafile=str(tls.ca_bundle))
        else:
            ctx = ssl.create_default_context(cafile=certifi.where())
    except FileNotFoundError:
        raise ConfigError(f"tls.ca_bundle: no such file {tls.ca_bundle}") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"tls.ca_bundle: {tls.ca_bundle} holds no usable PEM certificate "
                          f"({exc})") from None
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.client_cert is not None:
        try:
            # No passphrase to give: OpenSSL would otherwise prompt for one, on the terminal
            # or, without one, by reading stdin (a start under a supervisor hung there).
            ctx.load_cert_chain(str(tls.client_cert),
                                str(tls.client_key) if tls.client_key is not None else None,
                                password=_no_passphrase)
        except _Encrypted:
            raise ConfigError(f"tls.client_key: {tls.client_key or tls.client_cert} is "
                              "encrypted (passphrase-protected); give the key unencrypted "
                              "(openssl pkey -in KEY -out KEY.plain), readable by this "
                              "service only") from None
        except FileNotFoundError:
            raise ConfigError(f"tls.client_cert/client_key: no such file "
                              f"({tls.client_cert}, {tls.client_key})") from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"tls.client_cert/client_key: {tls.client_cert} and "
                              f"{tls.client_key} do not load as a PEM certificate and its key "
                              f"({exc})") from None
    return ctx
