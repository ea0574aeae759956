"""Errors as clients and operators are told them: each error code's one class and status, a
body that is not UTF-8 or not Unicode as a 4xx, a crash of ours as a 500, a start-up error as one
line naming its setting, health checks once the run supervisor stopped; and a run of another
worker, made-up HTTP methods in the metrics (most found in review, 2026-12-01: each test failed
before its fix)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import service.backends  # noqa: F401 (its error classes join the tree)
from service.errors import ServiceError, status_of_type
from service.settings import Settings

from ..servers import ROOT, running_server

pytestmark = pytest.mark.both_stores  # the end-to-end tests run on both stores


def _tree() -> list[type[ServiceError]]:
    classes, pending = [], [ServiceError]
    while pending:
        cls = pending.pop()
        classes.append(cls)
        pending.extend(cls.__subclasses__())
    return classes


def test_each_error_code_names_one_class_and_gives_its_status() -> None:
    classes = _tree()
    assert len({cls.type for cls in classes}) == len(classes)
    for cls in classes:
        assert status_of_type(cls.type) == cls.status
    assert status_of_type("run_timeout") == 504
    assert status_of_type("cancelled") == 409
    assert status_of_type("no_such_code") is None


async def test_invalid_utf8_body_is_400_not_500(settings: Settings) -> None:
    async with running_server(settings) as srv, srv.client() as c:
        r = await c.post("/api/conversations", content=b'{"title": "\xff"}',
                         headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text  # was a 500 (UnicodeDecodeError)
        assert r.json()["error"]["type"] == "malformed_json"


async def test_lone_surrogate_in_openai_messages_is_4xx_not_500(settings: Settings) -> None:
    async with running_server(settings) as srv, srv.client() as c:
        r = await c.post("/v1/chat/completions",
                         content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                         headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text  # was a 500 (UnicodeEncodeError in the store)
        r = await c.get("/api/conversations")
        assert r.json()["data"] == []


@pytest.mark.parametrize(("var", "value"), [("SERVICE_TOOLS", "no_such_module"),
                                        ("SERVICE_DB", "/dev/null/x.db"),
                                        ("SERVICE_BACKEND", "embedded"),
                                        ("SERVICE_GGUF", "not-a-model.gguf")])
def test_startup_setting_error_is_one_line(tmp_path: Path, var: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env.update({"SERVICE_DB": str(tmp_path / "s.db"), var: value})
    if var == "SERVICE_GGUF":
        # Found in review: a file that is not a model gave "llama.cpp failed to start on port
        # N", naming no setting.
        (tmp_path / value).write_bytes(b"GGUF but not really a model" * 100)
        env.update({"SERVICE_GGUF": str(tmp_path / value), "SERVICE_BACKEND": "embedded"})
    out = subprocess.run([sys.executable, "-m", "service", "--bind", "127.0.0.1:0"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    # (Embedded without a model is judged from the settings alone: exit 2, before the store.)
    assert out.returncode == (2 if (var, value) == ("SERVICE_BACKEND", "embedded") else 1)
    assert "Traceback" not in out.stderr + out.stdout
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("service: ")
    assert var in line  # names the setting (contract review: SERVICE_DB, _TOOLS did not)


def test_only_a_start_up_service_error_is_reported_as_one_line() -> None:
    # Found in review: a bug raised while handling a ServiceError, or grouped with one, was
    # reported as the ServiceError's one line and lost its traceback.
    from hypercorn.utils import LifespanFailureError

    from service.errors import ConfigError, StoreError
    from service.server import service_error

    config = ConfigError("cannot import tool module 'x'")
    try:
        try:
            raise config
        except ConfigError:
            raise LifespanFailureError("startup", "boom") from None
    except LifespanFailureError as exc:
        wrapped = ExceptionGroup("nursery", [ExceptionGroup("nursery", [exc])])
    assert service_error(wrapped) is config
    bug = KeyError("a bug")
    bug.__context__ = StoreError("store is closed")  # raised while handling it
    assert service_error(bug) is None
    assert service_error(ExceptionGroup("two", [StoreError("x"), TypeError("y")])) is None


async def test_a_run_of_another_worker_reads_as_running_and_its_cancel_is_passed_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in a contract review: the stored run stayed "queued" with no started_at until its
    # end, so another worker sharing the file showed it queued; and a cancel there answered
    # 202 while the run went on in its own process. The cancel is now written to the store
    # for the run's process (tests/runs/test_supervisor.py shows that process acting on it).
    import service.api.runs as runs_api
    from service.store import open_store
    from service.store.ownership import process_tag

    monkeypatch.setattr(runs_api, "ELSEWHERE_CANCEL_WAIT", 0.3)
    # The other worker (its store; our parent process stands for it) holds the run.
    async with running_server(settings) as srv, srv.client() as c, open_store(
            settings.db, process_id=process_tag(os.getppid())) as other:
        conv = (await c.post("/api/conversations", json={})).json()["id"]
        begun = await other.begin_run(conv, content="q", agent="chat", model=None)
        run = (await c.get(f"/api/runs/{begun.run.id}")).json()
        assert run["status"] == "running"
        assert run["started_at"] is not None
        r = await c.post(f"/api/runs/{begun.run.id}/cancel")
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "running"  # its process (our parent here) never ends it
        # Written for the run's process, which finds it on its next look.
        assert await other.cancel_requests() == [(begun.run.id, "cancelled by request")]


async def test_health_checks_report_a_stopped_run_supervisor(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found in review: when the supervisor ended (a SystemExit from a tool did it), hypercorn
    # only logged the lifespan's error: /healthz and /readyz stayed 200 while every run was a
    # 500. Then both said so (503); now, served with a shutdown trigger (as here, and under
    # python -m service or hypercorn's CLI), the server also stops, its serve raising
    # SupervisorFailed (exit 1), so that what runs it starts another.
    import trio
    import trio.testing

    from service.runs import upkeep
    from service.server import SupervisorFailed

    broken = trio.Event()
    health: list[int] = []

    async def crashing_loop(*args: object) -> None:
        await broken.wait()
        raise RuntimeError("a bug in the supervisor")

    async def serve_until_it_stops() -> None:
        async with running_server(settings) as srv, srv.client() as client:
            health.append((await client.get("/healthz")).status_code)
            broken.set()
            with trio.fail_after(30):
                await trio.sleep_forever()  # (the server stops: its serve raises)

    monkeypatch.setattr(upkeep, "cancel_requests_loop", crashing_loop)
    with pytest.RaisesGroup(pytest.RaisesExc(
            SupervisorFailed, match="^the run supervisor stopped: RuntimeError: a bug in the "
                                    "supervisor$"), flatten_subgroups=True):
        await serve_until_it_stops()
    assert health == [200]


async def test_made_up_http_methods_share_one_metric_series(settings: Settings) -> None:
    # Found in review: every made-up method (X0, X1, ...) added a service_http_requests_total
    # series for good, even from a client the auth refused: memory any client could grow.
    import re

    keyed = settings.model_copy(update={"api_keys": ("key-a",)})
    async with running_server(keyed) as srv, srv.client() as client:
        for i in range(20):
            r = await client.request(f"X{i}", "/api/conversations")
            assert r.status_code in (401, 405)
        text = (await client.get("/metrics", headers={"Authorization": "Bearer key-a"})).text
    methods = set(re.findall(r'service_http_requests_total\{method="([^"]*)"', text))
    assert methods <= {"GET", "other"}
    assert "other" in methods


async def test_a_run_that_crashes_is_a_500_not_a_502(settings: Settings) -> None:
    # Found in review: a bug of ours (the run ended internal_error) answered 502, "the backend
    # answered badly", sending whoever reads it after the wrong component.
    from ..fakes import Reply, ScriptedBackend

    backend = ScriptedBackend(lambda req: Reply("a b c", fail_after=1,
                                                error=RuntimeError("a bug in our code")))
    async with running_server(settings, backend) as srv, srv.client() as client:
        conv = (await client.post("/api/conversations", json={})).json()["id"]
        r = await client.post(f"/api/conversations/{conv}/messages", json={"content": "x"})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "internal_error"
        assert "Traceback" not in r.text
        r = await client.post("/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "x"}]})
        assert (r.status_code, r.json()["error"]["type"]) == (500, "internal_error")


def test_a_store_file_that_opens_but_cannot_be_read_names_service_db(tmp_path: Path) -> None:
    # Found in review: a file with a valid header and corrupt tables opened, then the first
    # read failed with a line naming no setting.
    import trio

    from service.store import open_store

    db = tmp_path / "c.db"

    async def fill() -> None:
        async with open_store(db) as store:
            conv = await store.create_conversation(title="t")
            for _ in range(200):
                await store.append_message(conv.id, role="user", content="x" * 500)

    trio.run(fill)
    data = bytearray(db.read_bytes())
    data[8192:] = b"\xab" * (len(data) - 8192)  # the header is fine, the tables are not
    db.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env["SERVICE_DB"] = str(db)
    out = subprocess.run([sys.executable, "-m", "service", "--bind", "127.0.0.1:0"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("service: SERVICE_DB: "), line
