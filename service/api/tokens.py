"""``POST /api/tokens``: a short-lived token for a browser's EventSource and WebSocket."""

from __future__ import annotations

import time

from pydantic import BaseModel
from quart import Blueprint, g
from quart_schema import validate_response

from ..tokens import TokenSigner
from .models import iso
from .state import services

__all__ = ["blueprint"]

blueprint = Blueprint("tokens", __name__)


class TokenOut(BaseModel):
    token: str
    expires_at: str


@blueprint.post("/api/tokens")
@validate_response(TokenOut, 200)
async def create_token() -> TokenOut:
    """A token for ``?access_token=`` on ``GET /api/runs/{id}/events`` and ``GET /api/ws``
    (only there), valid for 5 minutes and scoped to the key that asked for it."""
    signer: TokenSigner = services().extras["tokens"]
    token, expires = signer.issue(g.get("api_key", b""), time.time())
    return TokenOut(token=token, expires_at=iso(expires) or "")
