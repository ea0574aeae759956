"""Which process runs a run: tags made from /proc, leases, and whether the owner still lives.

A tag names a PID, a boot id, a start tick and a PID namespace. Every process also holds a lease
in the store (``instances``: its tag and a time until which it is alive, renewed every few
seconds by the supervisor's upkeep). Whether a run's owner lives (:func:`owner_alive`):

* in this PID namespace on this host (a sibling worker, or a previous life of this service):
  its PID tells a death at once (a process killed a moment ago is dead now, whatever its
  lease says), and a running process is alive whatever its lease says (the PID and its start
  tick cannot be fooled by a step of the wall clock, which a lease on SQLite is in); one that
  is stopped (SIGSTOP, a debugger) and let its lease run out is dead, as it would be on
  another host. (A process whose event loop hangs while it runs keeps its runs: only its
  lease could tell, and on one host the PID is trusted over the clock.)
* elsewhere (another host, another container): its lease; an instance killed there is dead
  once its lease has run out (``LEASE`` seconds at most);
* a tag of an older version with no lease: its PID, as before.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..text import clean_text, cut_at_stop
from .records import STEP_EVENTS, ends_a_step, stored_data

__all__ = ["LEASE", "alive", "close_interrupted", "owner_alive", "process_tag"]

LEASE = 15.0  # seconds an instance is taken for alive after its last renewal


def process_tag(pid: int) -> str:
    """How a process tags its runs: ``pid:time_ns``, plus ``:boot_id:start_ticks`` where /proc
    has them (Linux), which tell this process from a later one given the same PID."""
    tag = f"{pid}:{time.time_ns()}"
    stat, boot = _proc_stat(pid), _boot_id()
    if stat is not None and boot:
        tag += f":{boot}:{stat[1]}:{_pid_namespace()}"
    return tag


def owner_alive(process: str | None, current: str, lease_alive: bool | None) -> bool:
    """Whether the owner of a run lives (see the module's docstring). ``lease_alive``: whether
    its lease is current, None if it has none."""
    if not process:
        return False
    parts = process.split(":")
    here = (len(parts) >= 5 and parts[2] == _boot_id() and parts[4] == _pid_namespace())
    if here:
        return alive(process, current) and not (lease_alive is False and _stopped(parts[0]))
    if lease_alive is None:
        return alive(process, current)
    return lease_alive


def alive(process: str | None, current: str) -> bool:
    """Whether the process that tagged a run (:func:`process_tag`) still runs on this host."""
    if not process:
        return False
    parts = process.split(":")
    if parts[0] == current.split(":", 1)[0]:
        return False  # our PID, another start: a previous life of a reused PID (containers)
    try:
        pid = int(parts[0])
        os.kill(pid, 0)
    except (ValueError, OverflowError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc to ask: the PID exists
    state, ticks = stat
    if state in (b"Z", b"X"):
        return False  # it has exited; its parent has not reaped it yet
    boot = _boot_id()
    if len(parts) >= 4 and boot:
        # The same process only if it started at the tagged tick of the same boot: a PID
        # reused after a restart or a reboot is not it. Clock ticks after boot, not wall-clock
        # time, so a clock step (NTP) cannot make a live process look like another.
        return parts[2] == boot and parts[3] == str(ticks)
    return True  # cannot tell (a tag of an older version, no boot id): the PID exists


def _stopped(pid: str) -> bool:
    """Whether the process is stopped (SIGSTOP, a debugger's trace), from /proc."""
    try:
        stat = _proc_stat(int(pid))
    except ValueError:
        return False
    return stat is not None and stat[0] in (b"T", b"t")


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc; None if absent."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None


_PID_NS: list[str] = []  # read once


def _pid_namespace() -> str:
    """This process's PID namespace (its inode), or "" if unknown: PIDs only mean something
    inside one."""
    if not _PID_NS:
        try:
            _PID_NS.append(os.readlink("/proc/self/ns/pid").strip("pid:[]"))
        except OSError:
            return ""
    return _PID_NS[0]


_BOOT_ID: list[str] = []  # read once


def _boot_id() -> str:
    """This boot's id (Linux), or "" if unknown (a failed read is tried again next time)."""
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID.append(f.read().strip())
        except OSError:
            return ""
    return _BOOT_ID[0]


_alive = alive  # the name tests and older code use


class _Rows(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


Execute = Callable[[str, Any], _Rows]


def changed_at(execute: Execute, run_id: str, now: float) -> float:
    """When a run's reply changes now, as stored: this host's clock, but past its
    conversation's latest change (the instance that wrote it may have a clock ahead of this
    one's), so that the conversation's ``updated_at`` moves (docs/api.md). In the caller's
    write transaction; ``execute`` as :func:`close_interrupted`'s."""
    row = execute(
        "SELECT c.updated_at, (SELECT MAX(m.updated_at) FROM messages m "
        "WHERE m.conversation_id = c.id) FROM conversations c "
        "WHERE c.id = (SELECT conversation_id FROM runs WHERE id = ?)", (run_id,)).fetchone()
    latest = max((float(v) for v in row or () if v is not None), default=0.0)
    return max(now, time.time(), latest + 0.001)


# Besides the step events, what closing a run reads of its events: its answer's tokens, the
# agent an ``auto`` run chose, the stop sequences in its first event.
_CLOSE_READS = frozenset({"token", "decision", "run.started"})


def close_interrupted(execute: Execute, claim: str, run_id: str, reason: str, now: float,
                      process_id: str) -> bool:
    """Close one run whose owner is gone, in the caller's transaction; both stores' recovery.

    ``execute`` runs SQL written with ``?`` placeholders (the PostgreSQL store maps them);
    ``claim`` is the UPDATE that takes the run if it is still in progress, with the parameters
    (reason, now, process_id, run_id). The run becomes ``failed`` (or what its stored
    ``run.finished`` says: the store agrees with what clients were told, and a run has one
    ``run.finished``); its pending reply keeps the text of its token events after its last
    step (``records.ends_a_step``: the text before one was the step's). False: it was
    closed meanwhile (by another worker, or it finished).
    """
    # This host's clock, but never before the run's own times nor its conversation's latest
    # change (the instance that ran it may have had a clock ahead of this one's): a run does
    # not end before it started, and its end moves its conversation's updated_at.
    times = execute(
        "SELECT r.created_at, r.started_at, (SELECT MAX(e.created_at) FROM run_events e "
        "WHERE e.run_id = r.id) FROM runs r WHERE r.id = ?", (run_id,)).fetchone()
    now = max([changed_at(execute, run_id, now),
               *(float(v) for v in times or () if v is not None)])
    if not execute(claim, (reason, now, process_id, run_id)).rowcount:
        return False
    why = reason
    ended = execute("SELECT data FROM run_events WHERE run_id = ? AND type = 'run.finished'",
                    (run_id,)).fetchone()
    if ended is not None:
        # Its end is stored already (a store of an older version published ends apart from
        # final states).
        told = stored_data(ended[0])
        status = told.get("status", "failed")
        execute("UPDATE runs SET status = ?, error = ? WHERE id = ?",
                (status, told.get("error"), run_id))
        reply = execute("SELECT data FROM run_events WHERE run_id = ? AND type = 'message'",
                        (run_id,)).fetchone()
        if status == "succeeded" and reply is not None:
            execute("UPDATE messages SET status = 'complete', content = ?, updated_at = ? "
                    "WHERE run_id = ? AND status = 'pending'",
                    (stored_data(reply[0]).get("content", ""),
                     changed_at(execute, run_id, now), run_id))
            return True
        why = told.get("error") or reason
    # The reply's text so far is in its token events after its last step: keep it.
    parts: list[str] = []
    stepped = native = False
    decided: str | None = None  # the agent an ``auto`` run was routed to
    stop: list[str] = []  # a /v1 client's stop sequences its answer is cut at (run.started)
    streamed_by: str | None = None  # the model its events last named (their ``model``)
    for type_, data in execute(
            "SELECT type, data FROM run_events WHERE run_id = ? AND type IN "
            f"({', '.join(repr(t) for t in sorted(STEP_EVENTS | _CLOSE_READS))}) "
            "ORDER BY seq", (run_id,)).fetchall():
        told = stored_data(data)
        if isinstance(told.get("model"), str):  # a call's first token, thought or tool call
            # As an upstream named it (JSON may carry a lone surrogate, which no store can
            # encode): cleaned, as the live run stores it.
            streamed_by = clean_text(told["model"])
        if type_ == "token":
            parts.append(told.get("text", ""))
        elif type_ == "run.started":
            stop = [s for s in told.get("stop") or () if isinstance(s, str)]
        elif type_ == "decision":
            decided = told.get("agent")
        elif ends_a_step(type_, told):
            parts.clear()
            stepped = True
            native = native or (type_ == "tool.call" and told.get("native") is True)
    partial = "".join(parts)
    agent = execute("SELECT agent FROM runs WHERE id = ?", (run_id,)).fetchone()
    if agent is not None and (agent[0] == "react" or (agent[0] == "auto" and decided == "react")):
        # A ReAct run's text protocol: what the live run keeps of a turn cut short (an
        # ``auto`` run only once routed to ``react``: another agent's text is its answer).
        # (Imported here: the agents' package imports the store's.)
        from ..agents.react_parser import answer_so_far
        partial = answer_so_far(partial, first=not stepped, native=native)
        if stop:
            partial = partial.strip()  # as the live run cuts it (RunHandle.partial_text)
    partial = cut_at_stop(partial, tuple(stop))
    execute("UPDATE messages SET status = 'error', error = ?, content = ?, updated_at = ? "
            "WHERE run_id = ? AND status = 'pending'",
            (why and clean_text(why), clean_text(partial), changed_at(execute, run_id, now),
             run_id))
    if ended is None:
        model = _model_that_answered(execute, run_id, streamed_by)
        execute("INSERT INTO run_events (run_id, seq, type, data, created_at) "
                "SELECT ?, COALESCE(MAX(seq), 0) + 1, 'run.finished', ?, ? "
                "FROM run_events WHERE run_id = ?",
                (run_id, json.dumps({"status": "failed", "usage": {},
                                     **({"model": model} if model else {}),
                                     "error": reason, "content": partial}), now, run_id))
    return True


def _model_that_answered(execute: Execute, run_id: str, streamed_by: str | None) -> str | None:
    """The run's model: its own, or (the run named none) the one its events named, as its
    owner told its clients and would have stored it with its end (it keeps it in memory until
    then). None when none was told: an earlier call's model (a router's, a plan's) may not be
    the one that answered."""
    row = execute("SELECT model FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is not None and row[0]:
        return str(row[0])
    if streamed_by:
        execute("UPDATE runs SET model = ? WHERE id = ? AND model IS NULL", (streamed_by, run_id))
    return streamed_by
