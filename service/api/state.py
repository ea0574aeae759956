"""What a request handler reaches: the app's services (:class:`~service.services.Services`,
owned by its lifespan) and the caller's owner tag."""

from __future__ import annotations

from quart import current_app, g

from ..services import Services

__all__ = ["current_owner", "services"]


def services() -> Services:
    return current_app.extensions["service"]  # type: ignore[no-any-return]


def current_owner() -> str | None:
    """The owner tag of this request's API key (None when auth is off)."""
    return getattr(g, "owner", None)
