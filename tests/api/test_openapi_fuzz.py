"""Schemathesis against the real server: cases generated from /openapi.json, valid and invalid,
get no 5xx and only statuses the document lists. Bounded: a few examples an operation."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server

EXAMPLES = 12  # an operation; the whole run takes a few seconds


def _fuzz(spec: dict[str, Any], url: str) -> list[str]:
    """Every operation's generated cases, sent to ``url`` (blocking: run in a thread)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import status_code_conformance

    failures: list[str] = []
    for result in schemathesis.openapi.from_dict(spec).get_all_operations():
        operation = result.ok()
        if operation.path == "/api/ws":
            continue  # a WebSocket upgrade: not something schemathesis sends

        # Valid data and data that breaks the schema (each must get a 4xx, never a 5xx).
        @given(case=st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                              operation.as_strategy(GenerationMode.NEGATIVE)))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(base_url=url, timeout=15)
            case.validate_response(response, checks=[not_a_server_error,
                                                     status_code_conformance])

        try:
            check()
        except Exception as exc:  # a failure of this operation; the others still run
            failures.append(f"{operation.label}: {exc}")
    return failures


async def test_generated_requests_get_no_5xx_and_only_documented_statuses(
    settings: Settings,
) -> None:
    pytest.importorskip("schemathesis")
    backend = ScriptedBackend(lambda request: Reply("ok"))
    async with running_server(settings, backend) as srv, srv.client() as client:
        spec = (await client.get("/openapi.json")).json()
        with trio.fail_after(240):
            failures = await trio.to_thread.run_sync(_fuzz, spec, srv.url)
    assert failures == [], "\n\n".join(failures)


@pytest.mark.parametrize("keys", [(), ("k1",)])
async def test_the_document_says_what_the_service_answers(
    settings: Settings, keys: tuple[str, ...]
) -> None:
    # It had no security scheme and no 401, DELETE had no 204, the run events endpoint no 200
    # (text/event-stream) nor 204, bodies were optional and their 400/413 undocumented.
    from openapi_spec_validator import validate

    conf = settings.model_copy(update={"api_keys": keys})
    async with running_server(conf) as srv, srv.client() as client:
        spec = (await client.get("/openapi.json", headers={"Authorization": "Bearer k1"})).json()
    validate(spec)
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "one of SERVICE_API_KEYS (when set)"}
    paths = spec["paths"]
    for path, operations in paths.items():
        for method, op in operations.items():
            open_route = path in ("/healthz", "/readyz")
            assert ("401" in op["responses"]) == (bool(keys) and not open_route), (method, path)
            assert (op.get("security") == [{"bearer": []}]) == ("401" in op["responses"])
            if "requestBody" in op:
                assert op["requestBody"]["required"] is True
                assert {"400", "413", "422"} <= set(op["responses"]), (method, path)
    assert set(paths["/api/conversations/{conversation_id}"]["delete"]["responses"]) >= {"204"}
    events = paths["/api/runs/{run_id}/events"]["get"]["responses"]
    assert "text/event-stream" in events["200"]["content"]
    assert {"204", "404", "422"} <= set(events)
    for path in ("/api/conversations/{conversation_id}/messages", "/v1/chat/completions"):
        assert set(paths[path]["post"]["responses"]["200"]["content"]) == {
            "application/json", "text/event-stream"}
