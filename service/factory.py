"""Builds the ASGI application: routes, middleware and the lifespan that owns the services.

``create_app(settings)`` builds an app; ``service.app:app`` is one built from the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from typing import Any

from quart import Response, g, request, websocket
from quart_schema import QuartSchema
from quart_schema.openapi import OpenAPIProvider
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from . import __version__
from .api import backends as backends_api
from .api import conversations, openai, ops, runs, tokens, web, ws
from .api.errors import install_error_handlers, json_error
from .api.models import MAX_JSON_DEPTH, strict_json_loads, too_deep
from .api.owned import CancelOwnedRuns, mark_answered, note_request
from .backends.base import Backend
from .connections import install as keep_connection_failures_to_themselves
from .drainfirst import install as drain_runs_first
from .errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    RunCancelled,
    ServiceError,
    TooManyRuns,
)
from .expectcontinue import install as no_continue_for_a_body_over_the_cap
from .h2streams import install as guard_http2_streams
from .keepalive import KeepAliveFix
from .lifespan import _start_services, _stop_services
from .logs import REQUEST_ID, get_logger
from .metrics import METRICS, Metrics
from .origins import OriginPolicy
from .sendstall import install as drop_stalled_clients
from .services import Services
from .settings import Settings, load_settings
from .text import not_text_at
from .tokens import TokenSigner, expiry
from .wsclose import install as close_websockets_as_the_rfc_says
from .wsping import install as end_pings_with_their_socket

__all__ = ["create_app"]

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_NOT_CACHED = ("/api/", "/v1/")  # answers no cache may keep (see _end)
_WITH_BODIES = frozenset({"POST", "PUT", "PATCH", "DELETE"})  # bodies checked (see _begin)


class _OpenAPI(OpenAPIProvider):
    """quart-schema's document, plus what it cannot describe from models: ``/metrics`` (text)
    and ``/api/ws`` (a WebSocket: its messages are described in words)."""

    def schema(self) -> dict[str, Any]:
        spec: dict[str, Any] = super().schema()
        paths = spec.setdefault("paths", {})
        paths["/metrics"] = {"get": {
            "summary": "Prometheus text exposition",
            "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
        paths["/api/ws"] = {"get": {
            "summary": "WebSocket: runs and their events",
            "description": (
                'Upgrade to a WebSocket (same Authorization header). Client -> server: '
                '{"type": "message", "conversation_id", "content", "agent"?, "model"?, '
                '"on_disconnect"?, "timeout"?} and {"type": "cancel", "run_id"}. Server -> '
                'client: each run\'s events as {"run_id", "id", "type", "data"}, and '
                '{"type": "error", "error": {"type", "message"}, "request"?}.'),
            "responses": {
                "101": {"description": "switching to the WebSocket protocol"},
                "426": {"description": "a plain HTTP request: an upgrade is required"}}}}
        _truthful(spec, keys=bool(self._app.extensions["service"].settings.api_keys))
        return spec


_ERROR_SCHEMA = {"type": "object", "required": ["error"],
                 "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}}}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}
# What a body's endpoint answers before the handler runs (API.md's error statuses).
_BODY_ERRORS = {"400": "malformed JSON, or not a JSON object", "413": "body too large",
                "415": "a body not sent as Content-Type: application/json",
                "422": "invalid fields (naming the field)"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _ERROR_SCHEMA}}}


def _truthful(spec: dict[str, Any], *, keys: bool) -> None:
    """What quart-schema cannot tell from the decorators: the statuses the app answers before
    (or besides) a handler's models, streamed answers, and the bearer keys where they apply."""
    spec.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "one of SERVICE_API_KEYS (when set)"}}
    for path, operations in spec["paths"].items():
        for op in operations.values():
            # quart-schema's statuses are ints (they become strings in the JSON).
            responses = op["responses"] = {str(k): v for k, v in op.get("responses", {}).items()}
            if "requestBody" in op:
                op["requestBody"]["required"] = True
                for status, why in _BODY_ERRORS.items():
                    responses.setdefault(status, _error(why))
            if any(p.get("in") == "query" for p in op.get("parameters", ())):
                responses.setdefault("422", _error("invalid query parameters"))
            if keys and path not in _OPEN_ROUTES:
                op["security"] = [{"bearer": []}]
                responses.setdefault("401", _error("missing or wrong API key"))
            # Refused before the handler, whether or not it reads a body (``_begin``).
            responses.setdefault("413", _error("a body over SERVICE_MAX_BODY_BYTES"))
            # Refused before anything else runs (service/origins.py).
            responses.setdefault("403", _error(
                "a browser's request from an origin that is neither the service's own nor "
                "in SERVICE_CORS_ORIGINS"))
            if path.startswith(_STORED):
                responses.setdefault("503", _error(
                    "store_unavailable: the store cannot answer or write now (Retry-After)"))
    conversation = spec["paths"]["/api/conversations/{conversation_id}"]
    conversation["delete"]["responses"]["204"] = {
        "description": "deleted, with its messages and runs (its live runs cancelled)"}
    events = spec["paths"]["/api/runs/{run_id}/events"]["get"]
    events.setdefault("parameters", []).append({
        "in": "header", "name": "Last-Event-ID", "required": False,
        "description": "resume after this event id (the later of it and ?after=)",
        "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}})
    events["responses"]["200"] = {"description": "the run's events (SSE)", "content": _SSE}
    events["responses"]["204"] = {"description": "the run is over and the client has seen "
                                                 "all of it (an EventSource stops)"}
    events["responses"].setdefault("422", _error("a Last-Event-ID that is not an event id"))
    # A run that did not succeed (README: a non-streamed run's statuses).
    post_message = spec["paths"]["/api/conversations/{conversation_id}/messages"]["post"]
    post_message.setdefault("parameters", []).append({
        "in": "header", "name": "Idempotency-Key", "required": False,
        "description": "a request repeated with it gets the run the first began (its result "
                       "or its events), not another; with another content: 422",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                   "pattern": "^[\\x20-\\x7e]+$"}})
    for error, why in ((RunCancelled, "the run was cancelled"),
                       (TooManyRuns, "too many runs in flight"),
                       (BackendError, "the backend answered badly"),
                       (BackendUnavailable, "no backend reachable, or the store cannot write"),
                       (BackendTimeout, "the backend or the run timed out")):
        post_message["responses"].setdefault(str(error.status), _error(why))
    # While no backend can list its models (backend_unavailable), or one refuses the
    # service's key (backend_auth_failed): not a 404 saying the model does not exist.
    retrieve = spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    retrieve.setdefault("502", _error("a backend refused the service's credentials"))
    retrieve.setdefault("503", _error("no backend can list its models now"))
    for path in ("/api/conversations/{conversation_id}/messages", "/v1/chat/completions"):
        ok = spec["paths"][path]["post"]["responses"]["200"]
        ok.setdefault("content", {}).update(_SSE)  # with "stream": true
        ok["description"] += ' (with "stream": true, text/event-stream)'

log = get_logger("service.app")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# Open with keys set: the probes, the API's description and the chat page (they hold no data).
# The endpoints that read or write the store: 503 store_unavailable while it cannot.
_STORED = ("/api/conversations", "/api/runs", "/api/llm-calls", "/v1/chat/completions")
_OPEN_ROUTES = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs", "/"})
# A load balancer's probes, answered under any host name (with no keys too: they say up or down).
_PROBES = frozenset({"/healthz", "/readyz"})
# Whose successes are DEBUG access lines: the probes and the scrapes.
_QUIET_ACCESS = _PROBES | {"/metrics"}
# Where a browser's token (?access_token=, service/tokens.py) stands in for a key.
_EVENTS_RE = re.compile(r"/api/runs/[^/]+/events")


def _owner_of(key: str) -> str:
    # Conversations are tagged with a digest of the key, never the key itself.
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class _JSONRequest(TrioRequest):
    """Bodies are JSON, and must say so: any other Content-Type, or none, is 415. A page on
    another origin can send a "simple" POST (text/plain, a form, or a Blob with no type)
    without a CORS preflight; JSON it cannot send that way. NaN, Infinity and numbers out of
    a double's range are malformed JSON (400; ``create_app`` makes the app's JSON strict), as
    on the WebSocket: a NaN temperature was a misleading 422, and one inside a tool's schema
    reached the model's server."""

    async def get_json(  # type: ignore[override]
        self, force: bool = True, silent: bool = False, cache: bool = True
    ) -> Any:
        if not self.is_json:  # application/json or application/*+json, any charset
            raise UnsupportedMediaType(
                "the body must be JSON, sent with Content-Type: application/json")
        try:
            value = await super().get_json(force=force, silent=silent, cache=cache)
        # A 400, not a 500: "[[[[..." nested deeper than the parser goes, or a body that is
        # not UTF-8 (quart decodes it before parsing, outside its own ValueError handling).
        except (RecursionError, UnicodeDecodeError) as exc:
            if silent:
                return None
            return self.on_json_loading_failed(ValueError(f"the body is not JSON: {exc}"))
        # Nested deeper than any request needs: refused here, before a run's deeper stack
        # re-encodes it for the model's server (a RecursionError there crashed the run).
        if too_deep(value, await self.get_data(cache=True)):
            if silent:
                return None
            refused = BadRequest()
            refused.json_message = (  # type: ignore[attr-defined]  # said by the 400 (api/errors.py)
                f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
            raise refused
        return value


class _MergeSlashes:
    """ASGI: runs of slashes in a path are one (``/v1//chat/completions``, a client's base URL
    ending in "/", is ``/v1/chat/completions``), merged in place. Werkzeug's own merging
    answered a 308 with an HTML page, and redirected ``/api/runs//events`` to the run whose
    id is "events"; merged here it is a lookup of that id: a JSON 404."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if "//" in scope.get("path", ""):
            scope = {**scope, "path": re.sub("/{2,}", "/", scope["path"])}
            if isinstance(scope.get("raw_path"), bytes):
                scope["raw_path"] = re.sub(b"/{2,}", b"/", scope["raw_path"])
        await self.app(scope, receive, send)


class _App(QuartTrio):
    def log_exception(self, exc_info: Any) -> None:
        # An expected failure (a setting only checked at start-up: a tool module, the store's
        # path, a model file) is one line; main() prints it and exits. A bug keeps its traceback.
        exc = exc_info[1] if exc_info else None
        if isinstance(exc, ServiceError):
            self.logger.error("%s: %s", type(exc).__name__, exc.message)
            return
        super().log_exception(exc_info)


def create_app(
    settings: Settings | None = None,
    *,
    metrics: Metrics | None = None,
    backend: Backend | None = None,
) -> QuartTrio:
    """Build the app. ``backend`` replaces the one the settings describe (for tests)."""
    settings = settings or load_settings()
    app = _App(__name__)
    app.request_class = _JSONRequest
    # Doubled slashes are merged before routing (_MergeSlashes), never by Werkzeug's 308 with
    # an HTML page: /v1//chat/completions (a base URL ending in "/") is served as it was.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["QUART_SCHEMA_CONVERSION_PREFERENCE"] = "pydantic"
    QuartSchema(
        app,
        info={"title": "Trio agent service", "version": __version__},  # type: ignore[arg-type]
        openapi_path="/openapi.json",
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
        openapi_provider_class=_OpenAPI,
    )
    # Bodies are read strictly (quart-schema has just set the app's JSON provider).
    app.json.loads = lambda s, **_: strict_json_loads(s)  # type: ignore[method-assign]
    svc = Services(settings=settings, metrics=metrics or METRICS)
    app.extensions["service"] = svc
    install_error_handlers(app)
    app.register_blueprint(ops.blueprint)
    app.register_blueprint(conversations.blueprint)
    app.register_blueprint(runs.blueprint)
    app.register_blueprint(openai.blueprint)
    app.register_blueprint(ws.blueprint)
    app.register_blueprint(backends_api.blueprint)
    app.register_blueprint(tokens.blueprint)
    app.register_blueprint(web.blueprint)
    keys = tuple(k.encode() for k in settings.api_keys)
    origins = OriginPolicy(settings.cors_origins)
    signer = svc.extras["tokens"] = TokenSigner(keys)

    @app.before_serving
    async def _startup() -> None:
        await _start_services(app, svc, backend)

    @app.after_serving
    async def _shutdown() -> None:
        await _stop_services(svc)

    def _authorize(req: Any, *, token_route: bool) -> Response | None:
        headers = req.headers
        rid = headers.get("X-Request-ID", "")
        if not _REQUEST_ID_RE.match(rid):
            rid = f"req_{time.monotonic_ns():x}"
        REQUEST_ID.set(rid)
        g.request_id = rid
        note_request(req.scope, rid)
        g.started = time.perf_counter()
        if not keys and req.path not in _PROBES and not origins.serves_host(req.host):
            return json_error(403, "forbidden", "this host name is not served without keys "
                              "(another site's DNS name may point at this service: DNS "
                              "rebinding): set SERVICE_API_KEYS, list the origin in "
                              "SERVICE_CORS_ORIGINS, or call it at an IP address or "
                              "localhost")
        origin = headers.get("Origin")
        if origin is not None:
            # Before the key: another origin is refused whether or not it holds one.
            if not origins.allows(origin, scheme=req.scheme, host=req.host,
                                  keyed=bool(keys)):
                return json_error(403, "forbidden", "this origin may not call the service "
                                  "(SERVICE_CORS_ORIGINS lists the allowed ones; with no "
                                  "SERVICE_API_KEYS, a page is trusted as the service's own "
                                  "only at an IP address or a localhost name)")
            g.origin = origin
            if req.method == "OPTIONS" and "Access-Control-Request-Method" in headers:
                # A preflight carries no key; what it asks about is checked when it comes.
                resp = Response("", status=204)
                resp.headers.update(origins.preflight_headers(
                    origin, headers.get("Access-Control-Request-Headers")))
                return resp
        if keys:
            auth = headers.get("Authorization", "")
            given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            # Compare against every key, in constant time, so timing tells nothing.
            match = None
            for key in keys:
                if hmac.compare_digest(given, key):
                    match = key
            g.authenticated = match is not None
            if req.path in _OPEN_ROUTES or req.path.startswith(web.ASSETS_PREFIX):
                return None  # open, but shows its details only to a key (ops.py)
            if match is None and token_route and (token := req.args.get("access_token")):
                now = time.time()
                match = signer.verify(token, now)
                if match is not None:
                    g.token_expires = expiry(token)  # a WebSocket starts no run after it
                elif signer.verify(token, 0) is not None:
                    # Genuine, but past its expiry (in its clear text: saying so tells
                    # nothing): the page gets a new one rather than giving up (RFC 6750).
                    resp = json_error(401, "unauthorized",
                                      "the token expired: get a new one (POST /api/tokens)")
                    resp.headers["WWW-Authenticate"] = (
                        'Bearer error="invalid_token", error_description="the token expired"')
                    return resp
            if match is None:
                resp = json_error(401, "unauthorized", "missing or wrong API key")
                resp.headers["WWW-Authenticate"] = "Bearer"
                return resp
            g.owner = _owner_of(match.decode())
            g.api_key = match
        return None

    @app.before_request
    async def _begin() -> Response | None:
        events = request.method in ("GET", "HEAD") and _EVENTS_RE.fullmatch(request.path)
        refused = _authorize(request, token_route=bool(events))
        if refused is None and any(isinstance(v, str) and not_text_at(v) is not None
                                   for v in (request.view_args or {}).values()):
            # An id with a NUL or a lone surrogate names nothing (ids are a prefix and hex):
            # 404 here, as on SQLite; PostgreSQL's text cannot hold a NUL (it was a 500).
            return json_error(404, "not_found", "no such id")
        if refused is None:
            # The body's cap holds where a handler reads no body too (a cancel, a delete):
            # a body over it is a 413 and the request does nothing. A declared length is
            # known at once; a body of no declared length (chunked, or HTTP/2's DATA frames)
            # is read here, cached for the handler. (A GET's is never read: nothing it does
            # changes anything, and an events stream must not wait for a body.)
            cap = app.config["MAX_CONTENT_LENGTH"]
            length = request.content_length
            if length is not None and length > cap:
                raise RequestEntityTooLarge()
            if length is None and request.method in _WITH_BODIES:
                await request.get_data(cache=True)
        return refused

    @app.before_websocket
    async def _begin_ws() -> Response | None:
        # A refused handshake gets the same 401/403 JSON (hypercorn sends it as an HTTP
        # response), and its access line (after_request is not called for a WebSocket).
        refused = _authorize(websocket, token_route=websocket.path == "/api/ws")
        if refused is not None:
            log.info("WS %s %s", websocket.path, refused.status_code,
                     extra={"status": refused.status_code})
        return refused

    @app.after_request
    async def _end(response: Response) -> Response:
        if response.status_code == 413:
            # The rest of the body was not read: the connection cannot be reused safely.
            response.headers["Connection"] = "close"
        rid = getattr(g, "request_id", None)
        if rid:
            response.headers["X-Request-ID"] = rid
        # Every answer depends on the Origin (refused, or with CORS headers): caches must know.
        response.vary.add("Origin")
        if (origin := g.get("origin")) is not None:
            response.headers.update(origins.cors_headers(origin))
        if response.status_code in (204, 304):
            response.headers.pop("Content-Type", None)  # no body, no type (not text/html)
        if "Cache-Control" not in response.headers and request.path.startswith(_NOT_CACHED):
            # The API's answers are one owner's data and depend on more than their URL
            # (Last-Event-ID, the key): no cache keeps them (a 204 is cacheable by default,
            # and a proxy could answer a re-join from another cursor with it).
            response.headers["Cache-Control"] = "no-store"
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        # Only known methods as label values: any other token a client sends would add a
        # series for good (the request line is not authenticated).
        method = request.method if request.method in _METHODS else "other"
        svc.metrics.http_requests.labels(method, rule, str(response.status_code)).inc()
        started = getattr(g, "started", None)
        mark_answered(request.scope)  # (CancelOwnedRuns: no second line)
        log.log(
            # A probe's or scrape's success at DEBUG: every few seconds from each prober,
            # they buried the lines an operator reads (a refusal stays at INFO).
            logging.DEBUG if request.path in _QUIET_ACCESS and response.status_code < 400
            else logging.INFO,
            "%s %s %s", request.method, request.path, response.status_code,
            extra={
                "status": response.status_code,
                "ms": round((time.perf_counter() - started) * 1000, 2) if started else None,
            },
        )
        return response

    # Idle keep-alive connections get closed again (after keep_alive_timeout, or at shutdown);
    # runs a request started end with it unless handed over (service/api/owned.py).
    app.asgi_app = KeepAliveFix(  # type: ignore[method-assign]
        CancelOwnedRuns(_MergeSlashes(app.asgi_app)))
    # A client that stops reading but keeps its connection is dropped (service/sendstall.py).
    drop_stalled_clients(settings.sse_keepalive)
    # A body declared over the cap is answered 413, not told to go on (service/expectcontinue.py).
    no_continue_for_a_body_over_the_cap(settings.max_body_bytes)
    # WebSocket pings (build_config) end with their socket (service/wsping.py).
    end_pings_with_their_socket()
    # Protocol errors and over-cap messages close the socket with their code; no
    # permessage-deflate; 426 for another version (service/wsclose.py).
    close_websockets_as_the_rfc_says()
    # DATA for a closed HTTP/2 stream no longer ends the server; no WebSockets over HTTP/2
    # (service/h2streams.py).
    guard_http2_streams()
    # What else one connection's protocol layer raises ends that connection, not the server
    # (service/connections.py).
    keep_connection_failures_to_themselves()
    # Served by hypercorn's own entry points, runs drain before connections close, as under
    # python -m service (service/drainfirst.py).
    drain_runs_first()
    return app

