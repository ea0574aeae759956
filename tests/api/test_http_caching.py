"""No cache keeps the API's answers: they are one owner's data and depend on more than their
URL (a re-join's ``Last-Event-ID``, the key). A 204 is cacheable by default (RFC 9111): a proxy
could answer a re-join from another cursor with an earlier "it has ended". The real server on
port 0 with the simulator."""

from __future__ import annotations

import pytest
import trio

from service.settings import Settings
from service.sim import Reply

from ..e2e import GUARD, e2e, read_events

pytestmark = pytest.mark.both_stores


async def test_the_apis_answers_are_not_stored_by_caches(settings: Settings) -> None:
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(Reply(text="one two"), Reply(text="three"))
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "hi"})
            assert r.status_code == 200, r.text
            run_id = r.json()["run"]["id"]
            answers = {
                "list": await env.client.get("/api/conversations"),
                "conversation": await env.client.get(f"/api/conversations/{conv}"),
                "run": await env.client.get(f"/api/runs/{run_id}"),
                "missing": await env.client.get("/api/runs/run_nope"),
                "models": await env.client.get("/v1/models"),
            }
            events = await env.client.get(f"/api/runs/{run_id}/events")
            last = events.text.strip().split("\n\n")[-1]
            last_id = next(line[4:] for line in last.splitlines() if line.startswith("id: "))
            answers["ended"] = await env.client.get(f"/api/runs/{run_id}/events",
                                                    headers={"Last-Event-ID": last_id})
            async with env.post_stream(conv, "again") as stream:
                await read_events(stream)
            page = await env.client.get("/")
        assert answers["ended"].status_code == 204
        assert answers["missing"].status_code == 404
        for name, answer in answers.items():
            assert answer.headers.get("cache-control") == "no-store", (name, answer.headers)
        # A stream is revalidated, never replayed (as before); the page is the app's own.
        assert events.headers["cache-control"] == "no-cache"
        assert stream.headers["cache-control"] == "no-cache"
        assert page.headers["cache-control"] == "no-cache"
