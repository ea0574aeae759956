"""The JSON error model: every failure is ``{"error": {"type", "message", ...}}``.

Never a traceback: the operator finds that in the log, under the request id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from quart import Quart, Response, has_websocket_context, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import WebsocketMismatch

from ..errors import ServiceError
from ..logs import get_logger
from ..text import clean_text
from .models import error_body

__all__ = ["error_message", "field_name", "install_error_handlers", "json_error"]

log = get_logger("service.api")

_HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
}


def json_error(status: int, type_: str, message: str, **extra: Any) -> Response:
    resp = jsonify(error_body(type_, message, **extra))
    resp.status_code = status
    return resp


FIELD_CHARS = 200  # a field's name as an error names it, cut to this
_ERRORS_LISTED = 20  # a 422's ``errors``: the first ones


def field_name(loc: Sequence[int | str], whole: str = "body") -> str:
    """The field an error names, cut short: an unknown field's name is the client's, and
    echoed whole a megabyte of it came back as three (JSON escapes), once per field."""
    return clean_text(".".join(str(p) for p in loc)[:FIELD_CHARS]) or whole


def error_message(error: Any) -> str:
    """A validation error's message, without pydantic's "Value error, " before the text of a
    check of ours ("content: must be text", not "content: Value error, must be text")."""
    return str(error["msg"]).removeprefix("Value error, ")


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(RequestSchemaValidationError)
    async def _invalid(error: RequestSchemaValidationError) -> Response:
        exc = error.validation_error
        if isinstance(exc, ValidationError):
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            if errors and not errors[0]["loc"] and errors[0]["type"] in (
                "model_type", "dict_type", "model_attributes_type",
            ):
                return json_error(400, "malformed_json", "the body must be a JSON object")
            first = errors[0] if errors else {"loc": (), "msg": str(exc)}
            field = field_name(first["loc"])
            return json_error(
                422, "invalid_request", f"{field}: {error_message(first)}", field=field,
                errors=[{"field": field_name(e["loc"]), "message": error_message(e)}
                        for e in errors[:_ERRORS_LISTED]],
            )
        return json_error(400, "malformed_json", "the body must be a JSON object")

    @app.errorhandler(ServiceError)
    async def _service(error: ServiceError) -> Response:
        if error.status >= 500:
            log.warning("request failed: %s", error.message, extra={"error_type": error.type})
        resp = jsonify({"error": error.to_dict()})
        resp.status_code = error.status
        if error.retry_after is not None:
            resp.headers["Retry-After"] = str(error.retry_after)
        if not error.worth_retry:
            resp.headers["x-should-retry"] = "false"
        return resp

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Response:
        status = error.code or 500
        if isinstance(error, WebsocketMismatch):  # a BadRequest, but not about a body
            if has_websocket_context():
                return json_error(400, "bad_request", "this endpoint does not take WebSockets")
            resp = json_error(426, "websocket_required",
                              "this endpoint needs a WebSocket upgrade (Upgrade: websocket)")
            resp.headers["Upgrade"] = "websocket"  # a 426 names the protocol to switch to
            return resp
        if status == 400:
            # Quart raises BadRequest for undecodable JSON bodies (ours may say more).
            return json_error(400, "malformed_json", getattr(
                error, "json_message", None) or "the body is not valid JSON")
        message = error.description or error.name
        resp = json_error(status, _HTTP_TYPES.get(status, "http_error"), message)
        if status == 405 and getattr(error, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(error.valid_methods)  # type: ignore[attr-defined]
        return resp

    @app.errorhandler(Exception)
    async def _bug(error: Exception) -> Response:
        # The operator gets the traceback in the log; the client gets an opaque 500.
        log.error("unhandled error", exc_info=error)
        return json_error(500, "internal_error", "internal error (see the service log)")
