"""``/api/conversations``: create, list (newest first, cursor pages), get with messages, delete."""

from __future__ import annotations

from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request, validate_response

from .errors import json_error
from .models import (
    ConversationList,
    ConversationListItem,
    ConversationOut,
    ConversationQuery,
    ConversationWithMessages,
    CreateConversation,
    ErrorBody,
    ListConversationsQuery,
    MessageOut,
)
from .runs import stop_runs
from .state import current_owner, services

__all__ = ["blueprint"]

blueprint = Blueprint("conversations", __name__, url_prefix="/api/conversations")


@blueprint.post("")
@validate_request(CreateConversation)
@validate_response(ConversationOut, 201)
@validate_response(ErrorBody, 422)
async def create_conversation(data: CreateConversation) -> tuple[ConversationOut, int]:
    """Create a conversation."""
    if (supervisor := services().supervisor) is not None:
        supervisor.committer.refuse_while_refusing()  # as new runs (docs/operations.md)
    conv = await services().require_store().create_conversation(
        title=data.title, system=data.system, model=data.model, agent=data.agent,
        owner=current_owner(),
    )
    return ConversationOut.of(conv), 201


@blueprint.get("")
@validate_querystring(ListConversationsQuery)
@validate_response(ConversationList, 200)
async def list_conversations(
    query_args: ListConversationsQuery,
) -> ConversationList | Response:
    """List conversations, newest first; pass ``next`` back as ``before`` for the next page."""
    try:
        page, nxt = await services().require_store().list_conversations(
            owner=current_owner(), limit=query_args.limit, before=query_args.before
        )
    except ValueError as exc:
        return json_error(422, "invalid_request", f"before: {exc}", field="before")
    return ConversationList(data=[ConversationListItem.listed(c) for c in page], next=nxt)


@blueprint.get("/<conversation_id>")
@validate_querystring(ConversationQuery)
@validate_response(ConversationWithMessages, 200)
@validate_response(ErrorBody, 404)
async def get_conversation(
    conversation_id: str, query_args: ConversationQuery
) -> ConversationWithMessages | Response:
    """A conversation with its messages, oldest first: all of them, or with ``limit`` the
    newest N (before ``before``) and ``messages_next`` for the older ones."""
    store = services().require_store()
    # The conversation (its owner checked before anything is shown, and its updated_at),
    # then its messages, then the conversation again. Its updated_at is read before the
    # messages, so it never counts a change (a run's end) that they do not show: a client
    # syncing by updated_at would keep that reply as it was and never fetch it again (one
    # newer than what it shows only makes it fetch again). The last read: a conversation
    # deleted while its messages were read is a 404, not one with no messages, which the
    # store never held.
    conv = await store.get_conversation(conversation_id, owner=current_owner())
    nxt = None
    if query_args.limit is None and query_args.before is None:
        messages = await store.get_messages(conversation_id)
    else:
        try:
            messages, nxt = await store.message_page(
                conversation_id, limit=query_args.limit or 100, before=query_args.before)
        except ValueError as exc:
            return json_error(422, "invalid_request", f"before: {exc}", field="before")
    await store.get_conversation(conversation_id, owner=current_owner())
    return ConversationWithMessages(
        **ConversationOut.of(conv).model_dump(), messages=[MessageOut.of(m) for m in messages],
        messages_next=nxt,
    )


@blueprint.delete("/<conversation_id>")
@validate_response(ErrorBody, 404)
async def delete_conversation(conversation_id: str) -> tuple[str, int]:
    """Delete a conversation with its messages and runs; runs still going are cancelled
    first (their generation stops, and no run is left going that nobody can reach)."""
    store = services().require_store()
    await store.get_conversation(conversation_id, owner=current_owner())  # 404 if not theirs
    reason = "the conversation was deleted"
    supervisor = services().require_supervisor()
    await stop_runs(await store.runs_in_progress(conversation_id), reason)
    # A run begun on it meanwhile (another tab posting), in flight or with its first write
    # in flight, was not among those: stopped too, before the rows go (its LLM calls then go
    # with them; stopped after, one was kept tied to no run), and again after, for one begun
    # in between (its rows went with the conversation: it ran on, out of reach, its id 404).
    # (One on another worker or instance is stopped by its own process, whose upkeep finds
    # its row gone: runs_missing.)
    await supervisor.stop_conversation(conversation_id, reason)
    await store.delete_conversation(conversation_id, owner=current_owner())
    await supervisor.stop_conversation(conversation_id, reason)
    return "", 204
