"""A child process for the store's multi-process and crash tests.

    python tests/store_child.py DB CONVERSATION_ID COUNT TAG

Appends COUNT messages ``TAG:i`` to CONVERSATION_ID (COUNT 0: forever) and prints
``ACK <message id> <content>`` after each append has returned (the acknowledgement).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from service.store import SQLiteStore


async def main(db: str, conversation_id: str, count: int, tag: str) -> None:
    store = SQLiteStore(Path(db))
    await store.open()
    i = 0
    while count == 0 or i < count:
        msg = await store.append_message(conversation_id, role="user", content=f"{tag}:{i}")
        sys.stdout.write(f"ACK {msg.id} {msg.content}\n")
        sys.stdout.flush()
        i += 1
    await store.aclose()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
