"""The crash-safe conversation store (SQLite, WAL, trio-locked)."""

from .records import (
    Conversation,
    LLMCallOutcome,
    LLMCallRecord,
    Message,
    MessageStatus,
    RunEventRecord,
    RunRecord,
)
from .sqlite import Store, new_id, open_store

__all__ = [
    "Conversation",
    "LLMCallOutcome",
    "LLMCallRecord",
    "Message",
    "MessageStatus",
    "RunEventRecord",
    "RunRecord",
    "Store",
    "new_id",
    "open_store",
]
