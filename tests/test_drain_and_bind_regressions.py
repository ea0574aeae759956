"""Regressions of the change set ced0d62..0902b2f (a review): each test passed on ced0d62 and
failed on 0902b2f. Real servers on 127.0.0.1; processes of their own where signals or start-up
are the subject.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import textwrap
from functools import partial
from pathlib import Path
from typing import Any

import trio

from service.lifespan import begin_shutdown
from service.settings import Settings
from service.sim import Reply

from .e2e import GUARD, EventStream, after_tokens, e2e
from .servers import ROOT, RunningServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVICE_")}
    env["PYTHONPATH"] = str(ROOT)  # this tree's service, whatever the venv has installed
    env.update(extra)
    return env


# -- paths ---------------------------------------------------------------------------------------


async def test_a_doubled_slash_from_a_redirect_following_client_still_reaches_the_endpoint(
    server: RunningServer,
) -> None:
    # A client whose base URL ends in "/" and that joins "/chat/completions" sends
    # /v1//chat/completions. Werkzeug merged the slashes (a 308 to the right path) and a client
    # that follows redirects, as the OpenAI SDK's httpx client does (follow_redirects=True),
    # `requests` and a browser's fetch do, got its completion. merge_slashes = False made it a
    # 404: the request that worked is now refused.
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    async with server.client(follow_redirects=True) as client:
        r = await client.post("/v1//chat/completions", json=body)
        listed = await client.get("/api//conversations")
    assert (r.status_code, listed.status_code) == (200, 200), (r.text, listed.text)


# -- shutdown ------------------------------------------------------------------------------------


async def test_a_client_that_leaves_while_the_service_drains_is_stored_as_a_disconnect(
    settings: Settings,
) -> None:
    # RunHandle.client_left() labels every request that ends while the supervisor drains as
    # "shutdown". With the drain first (python -m service, and now hypercorn's own entry
    # points), hypercorn cuts no request while runs still go: what ends a request during the
    # drain's grace is the client leaving. Its run was stored "client disconnected"; now the
    # store says the shutdown ended a run that its client abandoned.
    async with e2e(settings, "llamacpp", shutdown_drain=30.0) as env:
        env.sim.script(Reply(tokens=2000, interval=0.02))
        conv = await env.conversation()
        svc = env.server.services
        supervisor = svc.require_supervisor()
        with trio.fail_after(3 * GUARD):
            async with trio.open_nursery() as nursery:
                async with env.post_stream(conv, "go") as resp:
                    stream = EventStream(resp)
                    seen = await stream.read(after_tokens(3))
                    run_id = seen[0].data["run_id"]

                    async def drain(*, task_status: Any) -> None:  # noqa: ASYNC114
                        task_status.started()
                        await begin_shutdown(svc)  # draining is set before its first await

                    await nursery.start(drain)
                    assert supervisor.draining
                    handle = supervisor.get(run_id)
                    assert handle is not None
                    assert not handle.done
                # The client has closed its stream (it left, mid-run, during the grace).
                await handle.finished.wait()
        run = await env.client.get(f"/api/runs/{run_id}")
        assert run.status_code == 200, run.text
        stored = run.json()
    assert (stored["status"], stored["error"]) == ("cancelled", "client disconnected"), stored


# -- signals of a process that embeds hypercorn.trio.serve ----------------------------------------

_EMBEDDING = textwrap.dedent("""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from service.factory import create_app
    from service.settings import load_settings

    async def main():
        app = create_app(load_settings())
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None

        async def server(*, task_status):
            await serve(app, config, task_status=task_status)
            print("SERVE RETURNED", flush=True)

        async with trio.open_nursery() as nursery:
            # The embedding's own work, beside the server (a queue consumer, a scheduler...).
            nursery.start_soon(trio.sleep_forever)
            binds = await nursery.start(server)
            print("LISTENING", binds[0], flush=True)

    trio.run(main)
""")


async def test_sigterm_still_ends_a_process_that_embeds_hypercorn_trio_serve(
    tmp_path: Path,
) -> None:
    # An embedding calls hypercorn.trio.serve(app, config) without a shutdown trigger, next to
    # work of its own. SIGTERM ended that process (its default disposition). Since create_app
    # patches hypercorn.trio.worker_serve (service/drainfirst.py), serve takes SIGTERM and SIGINT
    # for itself: the server drains and returns, and the process goes on running with no server
    # and no way left to stop it but a second signal or SIGKILL (a `docker stop` waits out its
    # timeout). A library call must not take over the process's signals.
    script = tmp_path / "embed.py"
    script.write_text(_EMBEDDING)
    env = _env(SERVICE_DB=str(tmp_path / "service.db"), SERVICE_BACKEND="llamacpp",
               SERVICE_LLAMACPP_URL="http://127.0.0.1:9", SERVICE_SHUTDOWN_DRAIN="0")
    log = tmp_path / "embed.log"
    err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script)], cwd=ROOT, env=env, stdout=-1, stderr=err)
    finally:
        os.close(err)
    assert proc.stdout is not None
    out = b""
    try:
        with trio.fail_after(6 * GUARD):
            while b"LISTENING" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, log.read_text()
                out += chunk
            proc.send_signal(signal.SIGTERM)
            # The process ends (its stdout closes), or its server returns and it runs on.
            while b"SERVE RETURNED" not in out:
                chunk = await proc.stdout.receive_some()
                if not chunk:
                    break
                out += chunk
            with trio.move_on_after(GUARD):  # every chance to exit all the same
                await proc.wait()
        running_on = proc.returncode is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with trio.move_on_after(GUARD, shield=True):
            await proc.wait()
    assert not running_on, ("SIGTERM no longer ends the process: its server shut down and "
                            "it ran on", out.decode(), log.read_text()[-1500:])


# -- start-up ------------------------------------------------------------------------------------


async def test_python_m_service_takes_no_connection_before_it_can_serve(tmp_path: Path) -> None:
    # service.server.main now binds and listens (service.server.listen) before the app starts;
    # hypercorn used to bind only once the lifespan's start-up was done. While the start-up
    # runs (a store to open, recovery, the embedded model's load: up to startup_timeout,
    # 150 s) the kernel now accepts connections into the backlog and nobody answers them: a
    # client (or a TCP readiness probe, which now says "up") hangs instead of being refused
    # at once and trying another instance. Here the start-up waits on a PostgreSQL server that
    # accepts and never answers.
    held: list[trio.SocketStream] = []
    connected = trio.Event()

    async def silent_pg(stream: trio.SocketStream) -> None:
        held.append(stream)
        connected.set()
        await trio.sleep_forever()

    port = _free_port()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent_pg, 0, host="127.0.0.1"))
        pg_port = listeners[0].socket.getsockname()[1]
        log = tmp_path / "service.log"
        err = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "service", "--bind", f"127.0.0.1:{port}",
                 "--config", str(ROOT / "hypercorn.toml")],
                cwd=tmp_path, stderr=err,
                env=_env(SERVICE_DB=f"postgresql://u@127.0.0.1:{pg_port}/db?sslmode=disable",
                         SERVICE_BACKEND="llamacpp",
                         SERVICE_LLAMACPP_URL="http://127.0.0.1:9"))
        finally:
            os.close(err)
        try:
            with trio.fail_after(3 * GUARD):
                await connected.wait()  # the start-up is under way, and cannot finish yet
            accepted: Any = None
            with contextlib.suppress(OSError):
                accepted = await trio.open_tcp_stream("127.0.0.1", port)
            if accepted is not None:
                await accepted.aclose()
            assert accepted is None, ("a connection was accepted by a service that cannot "
                                      "answer it yet", log.read_text()[-1000:])
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with trio.move_on_after(GUARD, shield=True):
                await proc.wait()
                for stream in held:
                    await stream.aclose()
            nursery.cancel_scope.cancel()
