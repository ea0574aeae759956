"""Outside review (2026-12-07, pass i): what the model is sent, turn after turn, is a
well-formed conversation. End to end: the real server on port 0, the simulator upstream on
loopback, the test reads the exact ``messages`` each upstream request carried.

Real chat templates are strict (llama.cpp's server renders them with its Jinja engine and answers
a template's ``raise_exception`` with an error; Ollama renders what it gets): Llama 2's, Mistral's
(v0.1-v0.2) and Gemma's (2 and 3) templates raise "Conversation roles must alternate
user/assistant/user/assistant/..." on two messages of one role in a row, on a conversation that
does not start with the user, or on a system message anywhere but first (Gemma 3 folds the
first system message into the first user turn, and then checks alternation over the rest; a
second system message is a non-user message at an even index: it raises). Each failing test also
replays the messages the simulator got to llama.cpp's real server (xllamacpp, ``--jinja``, the
tiny model with Gemma 3's template, ``strict_llama``): it answers them 400 "Conversation roles
must alternate" (the last test goes through the service itself on that server). Failing tests
show a defect each; their docstrings say the client's actions, what the model got, and where.
Passing ones pin sequences that hold (the failed, the cancelled and the concurrent turn: they
pass with the working tree's build_history of 2026-12-07, which leaves an unanswered question
out; the concurrent one fails on e85fefe's).
"""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio

from service.settings import BackendKind, Settings
from service.sim import Reply

from .e2e import GUARD, KINDS, Env, EventStream, e2e
from .servers import running_server
from .streams import parse_sse

# Gemma 3's chat template, reduced to what decides whether a prompt is taken (its first system
# message folded into the first user turn, then its alternation check over the rest).
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)



@pytest.fixture(scope="module")
def strict_llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """llama.cpp's real server (xllamacpp, the tiny model, one thread) rendering with
    ``--jinja`` and Gemma 3's template; its URL, or None without the embedded extra."""
    try:
        import xllamacpp

        from service.backends import embedded
        from service.tinymodel import write_tiny_model
    except ImportError:
        yield None
        return
    model = write_tiny_model(tmp_path_factory.mktemp("strict") / "tiny.gguf")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    params = embedded._params(xllamacpp, model, port, n_parallel=1, n_ctx=8192, threads=1,
                              alias="tiny", verbosity=0, n_predict=4)
    params.use_jinja = True
    params.chat_template = GEMMA_TEMPLATE
    server = [xllamacpp.Server(params)]
    yield f"http://127.0.0.1:{port}"
    server.clear()


async def _refusal(url: str | None, body: dict[str, Any]) -> str:
    """``body``'s messages replayed to the strict llama.cpp server: "" if it takes them, else
    its status and error."""
    if url is None:
        return ""
    messages = [{k: v for k, v in m.items() if k in ("role", "content", "tool_calls",
                                                     "tool_call_id")}
                for m in body["messages"]]
    async with httpx.AsyncClient(timeout=GUARD) as client:
        r = await client.post(f"{url}/v1/chat/completions",
                              json={"model": "tiny", "messages": messages, "max_tokens": 1})
    return "" if r.status_code == 200 else f"llama.cpp {r.status_code}: {r.text[:400]}"


ACTION = 'Thought: add\nAction: calculator\nAction Input: {"expression": "1+1"}'


def _roles(body: dict[str, Any]) -> list[str]:
    return [m["role"] for m in body["messages"]]


def _malformed(roles: list[str]) -> list[str]:
    """What a strict template (Llama 2, Mistral, Gemma) refuses in this sequence of roles."""
    wrong = []
    if "system" in roles[1:]:
        wrong.append(f"a system message that is not first: {roles}")
    talk = [r for r in roles if r in ("user", "assistant")]
    if talk and talk[0] != "user":
        wrong.append(f"the conversation does not start with the user: {roles}")
    for a, b in itertools.pairwise(roles):
        if a == b and a in ("user", "assistant"):
            wrong.append(f"two {a} messages in a row: {roles}")
            break
    return wrong


async def _ask(env: Env, conv: str, content: str, **body: Any) -> dict[str, Any]:
    with trio.fail_after(GUARD):
        r = await env.client.post(f"/api/conversations/{conv}/messages",
                                  json={"content": content, **body})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _plan(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


# -- 1. the agent's own system prompt and the conversation's -----------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("agent", ["react", "plan_execute"])
async def test_a_conversations_system_prompt_and_the_agents_are_two_system_messages(
    settings: Settings, strict_llama: str | None, kind: str, agent: str,
) -> None:
    """Client: ``POST /api/conversations {"system": "Answer in French.", "agent": A}`` (A
    ``react`` or ``plan_execute``), then one message. The model's first call gets
    ``[system (the agent's: REACT_SYSTEM / PLAN_SYSTEM), system ("Answer in French."), user]``:
    two system messages, the second not first. Gemma 3's template raises "Conversation roles
    must alternate" on it (the second system message at index 0 of its loop), Gemma 2's
    "System role not supported" only on the first, Llama 2's and Mistral's v0.1-0.2
    alternation check raises too; where a template tolerates it (ChatML, Llama 3), the
    deployer's instruction comes after the agent's, as a second preamble, and Ollama's
    templates that read ``.System`` take one. The same with a ``/v1`` request naming
    ``agent: react`` whose messages start with a ``system`` (or ``developer``) message
    (next test). The ``chat`` agent sends one system message.

    Likely spot: service/agents/react.py ``ReActAgent.run`` (``[ChatMessage("system",
    self.system_prompt(ctx)), *ctx.history]``) and service/agents/plan_execute.py
    ``PlanExecuteAgent.make_plan`` (``[ChatMessage("system", system), *ctx.history]``): the
    history's own leading system message(s) should be merged into the agent's one."""
    async with e2e(settings, kind) as env:
        if agent == "react":
            env.sim.script("Thought: I know it\nFinal Answer: bonjour")
        else:
            env.sim.script(_plan({"id": 1, "task": "add", "tool": "calculator",
                                  "arguments": {"expression": "1+1"}}), "deux")
        conv = await env.conversation(system="Answer in French.", agent=agent)
        result = await _ask(env, conv, "hello")
        assert result["run"]["status"] == "succeeded", result
        first = env.sim.streams[0].body
        refused = await _refusal(strict_llama, first)
        assert (_malformed(_roles(first)), refused) == ([], ""), first["messages"]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_plan_steps_call_carries_the_conversations_system_prompt(
    settings: Settings, strict_llama: str | None, kind: str,
) -> None:
    """Fixed (helper-142's note): a plan step's own model call (a step with no tool: a small
    ReAct loop) got the step agent's system prompt and its task only. The conversation's
    ("Answer in French.", a deployer's rules) held in the plan and the synthesis, not in the
    steps' work. Now joined to the step agent's, one system message, as react's run does."""
    async with e2e(settings, kind) as env:
        env.sim.script(_plan({"id": 1, "task": "say hello"}),
                       "Thought: easy\nFinal Answer: bonjour", "bonjour")
        conv = await env.conversation(system="Answer in French.", agent="plan_execute")
        result = await _ask(env, conv, "hello")
        assert result["run"]["status"] == "succeeded", result
        step = env.sim.streams[1].body
        assert _roles(step) == ["system", "user"], step["messages"]
        system = step["messages"][0]["content"]
        assert "Answer in French." in system, system
        assert "Final Answer" in system, system  # the step agent's own
        assert "Do this step: say hello" in step["messages"][1]["content"]
        assert await _refusal(strict_llama, step) == ""


async def test_tool_call_ids_a_server_numbers_per_response_are_unique_in_the_run(
    settings: Settings,
) -> None:
    """Fixed (helper-141's note): llama.cpp's server (and the simulator, as it) numbers a
    response's tool calls from ``call_..._0``; two ReAct turns (or two parallel plan steps)
    gave the same ``call_id`` twice in one run's events, and a client pairing ``tool.call``
    with ``tool.result`` by id mixed them up. A repeated id is replaced before anything is
    told; the model is shown each call and its result under the one id."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(
            Reply(tool_calls=({"name": "calculator", "arguments": {"expression": "1+1"}},)),
            Reply(tool_calls=({"name": "calculator", "arguments": {"expression": "2+2"}},)),
            "2 and 4")
        conv = await env.conversation(agent="react")
        result = await _ask(env, conv, "add")
        assert result["run"]["status"] == "succeeded", result
        r = await env.client.get(f"/api/runs/{result['run']['id']}/events")
        frames = [(f["event"], f["data"]) for f in parse_sse(r.text)]
        calls = [d["call_id"] for t, d in frames if t == "tool.call"]
        results = [d["call_id"] for t, d in frames if t == "tool.result"]
        assert len(set(calls)) == 2, frames
        assert results == calls
        last = env.sim.streams[2].body["messages"]
        asked = [c["id"] for m in last if m["role"] == "assistant" for c in m["tool_calls"]]
        answered = [m["tool_call_id"] for m in last if m["role"] == "tool"]
        assert asked == answered == calls, last
        # (Not replayed to Gemma's template: it has no tool role, and a server with it does
        # not make native tool calls.)


async def test_a_v1_react_request_with_a_system_message_sends_two_system_messages(
    settings: Settings, strict_llama: str | None,
) -> None:
    """Client: ``POST /v1/chat/completions {"agent": "react", "messages": [{"role":
    "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]}`` (the most
    common shape of an OpenAI request). The model gets ``[system (REACT_SYSTEM), system
    ("Be terse."), user]``. docs/api.md says a ``/v1`` request's messages "go to the model
    whole and in their order (a system message in the middle stays there)" — but here the
    client's system message was first, and the service put it second. Same template rules as
    the test above. Likely spot: service/agents/react.py ``ReActAgent.run``."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script("Thought: I know it\nFinal Answer: hi")
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "agent": "react",
                "messages": [{"role": "system", "content": "Be terse."},
                             {"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        body = env.sim.streams[0].body
        refused = await _refusal(strict_llama, body)
        assert (_malformed(_roles(body)), refused) == ([], ""), body["messages"]


# -- 2. ReAct's step limit after text-protocol steps ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_react_step_limit_after_text_protocol_steps_sends_two_user_messages(
    settings: Settings, strict_llama: str | None, kind: str,
) -> None:
    """Client: one message to a ``react`` conversation; the model (no native tool calls, as
    most small models on llama.cpp without ``--jinja``) answers in the text protocol, an
    ``Action:`` each turn, for all 8 steps. Each step appends ``assistant`` (the turn up to its
    action) and ``user`` (``"Observation: ..."``); at the limit the loop appends another
    ``user`` (``LIMIT_PROMPT``). The last call gets ``[..., assistant, user "Observation: 2",
    user "You have reached the limit of 8 steps..."]``: two user messages in a row, which
    Llama 2's, Mistral's and Gemma's templates refuse ("Conversation roles must alternate")
    — the very call that should give the user an answer after eight steps fails the run
    (llama.cpp answers the template's exception with an error). With native tool calls the
    limit prompt follows ``tool`` messages, which is fine.

    Likely spot: service/agents/react.py ``ReActAgent.loop``, the step-limit branch
    (``messages.append(ChatMessage("user", LIMIT_PROMPT...))`` after a ``user``
    Observation: fold the limit note into that last observation instead)."""
    async with e2e(settings, kind) as env:
        env.sim.script(*[ACTION] * 8, "Final Answer: 2")
        conv = await env.conversation(agent="react")
        result = await _ask(env, conv, "add one and one, repeatedly")
        assert result["run"]["status"] == "succeeded", result
        assert len(env.sim.streams) == 9
        last = env.sim.streams[8].body
        assert "limit of 8 steps" in last["messages"][-1]["content"]
        refused = await _refusal(strict_llama, last)
        assert (_malformed(_roles(last)), refused) == ([], ""), _roles(last)


# -- 3. plan_execute's re-plan ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_replan_after_a_failed_step_sends_two_user_messages(
    settings: Settings, strict_llama: str | None, kind: str,
) -> None:
    """Client: one message to a ``plan_execute`` conversation; the plan's one step, a
    calculator call, fails (``1/0``: an error observation), so the agent re-plans
    (``make_plan(extra=...)``). The re-plan call gets ``[system (PLAN_SYSTEM), user (the
    question), user ("A step failed: ... Make a new plan ...")]``: two user messages in a
    row, refused by Llama 2's, Mistral's and Gemma's templates ("Conversation roles must
    alternate"); the re-plan fails with the model's server's error, the run's recovery path
    is the one that breaks. (Ollama renders it, two user turns back to back.)

    Likely spot: service/agents/plan_execute.py ``PlanExecuteAgent.make_plan``
    (``messages.append(ChatMessage("user", extra))`` after ``*ctx.history``, which ends with
    the question: the note should be joined to that last user message, or follow an
    assistant turn such as the first plan)."""
    async with e2e(settings, kind) as env:
        env.sim.script(
            _plan({"id": 1, "task": "divide", "tool": "calculator",
                   "arguments": {"expression": "1/0"}}),
            _plan({"id": 1, "task": "add", "tool": "calculator",
                   "arguments": {"expression": "1+1"}}),
            "It is 2.",
        )
        conv = await env.conversation(agent="plan_execute")
        result = await _ask(env, conv, "divide one by zero")
        assert result["run"]["status"] == "succeeded", result
        assert len(env.sim.streams) == 3
        replan = env.sim.streams[1].body
        assert "A step failed" in replan["messages"][-1]["content"]
        refused = await _refusal(strict_llama, replan)
        assert (_malformed(_roles(replan)), refused) == ([], ""), _roles(replan)


# -- 4. two runs on one conversation at once --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_second_message_while_the_first_is_answered_is_well_formed(
    settings: Settings, strict_llama: str | None, kind: str,
) -> None:
    """Holds (a pin, passing with the working tree's build_history): the client posts
    "first question" to a conversation (streamed; the model is slow to answer) and, before
    that answer is done, "second question" to the same conversation (another tab, or two
    WebSocket messages: nothing refuses a second run on a conversation). The second run's
    history leaves out the first run's pending reply and its question with it: the model
    gets ``[user "second question"]``, not two user messages in a row."""
    async with e2e(settings, kind) as env:
        env.sim.script(Reply(hang_after=1, text="one two three"), "second answer")
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "first question") as response:
                stream = EventStream(response)
                events = await stream.read(
                    lambda ev: any(e.type == "token" for e in ev))
                (started,) = [e for e in events if e.type == "run.started"]
                first_run = started.data["run_id"]
                result = await _ask(env, conv, "second question")
                assert result["run"]["status"] == "succeeded", result
                r = await env.client.post(f"/api/runs/{first_run}/cancel")
                assert r.status_code == 202, r.text
                await stream.read()
        second = env.sim.streams[1].body
        assert [m["content"] for m in second["messages"]][-1] == "second question"
        assert _malformed(_roles(second)) == [], second["messages"]
        assert await _refusal(strict_llama, second) == ""


# -- 5. plan_execute's synthesis over a /v1 history with tool turns ---------------------------


async def test_v1_plan_execute_synthesis_after_client_tool_turns_has_two_assistants(
    settings: Settings, strict_llama: str | None,
) -> None:
    """Client: ``POST /v1/chat/completions {"agent": "plan_execute", "messages": [user "What
    is 2+2?", assistant "4", user "And times 10?", assistant {tool_calls: [calculator
    "4*10"]}, tool "40"]}`` (an OpenAI client's history after a tool round; no ``tools`` in
    the request, so the agent is allowed). The synthesis removes the question (its prompt
    restates it) but keeps what followed it, so the model gets ``[user "What is 2+2?",
    assistant "4", assistant {tool_calls}, tool "40", user "Answer the user's request..."]``:
    two assistant messages in a row (Llama 2's, Mistral's, Gemma's templates: "Conversation
    roles must alternate"), and the tool call is no longer the answer to anything the user
    asked. Without the earlier turn the synthesis starts with the assistant's tool call (no
    user first: the same templates refuse it).

    Likely spot: service/agents/plan_execute.py ``PlanExecuteAgent.run``, the synthesis
    (``history = [*ctx.history[:i], *ctx.history[i + 1:]]``: dropping the question leaves
    what followed it hanging; keep it, or drop what follows it too)."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(_plan({"id": 1, "task": "multiply", "tool": "calculator",
                              "arguments": {"expression": "4*10"}}), "It is 40.")
        with trio.fail_after(GUARD):
            r = await env.client.post("/v1/chat/completions", json={
                "model": "sim-model", "agent": "plan_execute",
                "messages": [
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And times 10?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {
                            "name": "calculator", "arguments": '{"expression": "4*10"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "40"},
                ]})
        assert r.status_code == 200, r.text
        assert len(env.sim.streams) == 2
        synthesis = env.sim.streams[1].body
        assert "Results:" in synthesis["messages"][-1]["content"]
        # (Not replayed to the strict server: Gemma's template takes no ``tool`` message at
        # all, so the client's own tool round is refused there whatever the service sends.)
        assert _malformed(_roles(synthesis)) == [], _roles(synthesis)


async def test_a_plan_steps_react_loop_at_its_limit_sends_two_user_messages(
    settings: Settings, strict_llama: str | None,
) -> None:
    """The step-limit defect above inside ``plan_execute``: a step without a tool runs a
    short ReAct loop (4 steps, ``fail_at_limit``). Client: one message to a ``plan_execute``
    conversation; the plan's one step is worked out by the model in the text protocol, an
    action each turn. The step's last call gets ``[system (the step's REACT_SYSTEM), user "Do
    this step: ...", assistant, user "Observation: 2", ..., user "Observation: 2", user "You
    have reached the limit of 4 steps..."]``: two user messages in a row (Llama 2's,
    Mistral's, Gemma's templates: "Conversation roles must alternate"). Same spot:
    service/agents/react.py ``ReActAgent.loop``, the step-limit branch."""
    async with e2e(settings, "llamacpp") as env:
        env.sim.script(_plan({"id": 1, "task": "add one and one"}), *[ACTION] * 4,
                       "Final Answer: 2", "It is 2.")
        conv = await env.conversation(agent="plan_execute")
        result = await _ask(env, conv, "add one and one")
        assert result["run"]["status"] == "succeeded", result
        assert len(env.sim.streams) == 7
        limit = env.sim.streams[5].body
        assert "limit of 4 steps" in limit["messages"][-1]["content"]
        refused = await _refusal(strict_llama, limit)
        assert (_malformed(_roles(limit)), refused) == ([], ""), _roles(limit)[-3:]


# -- 6. sequences that hold (pins) -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failed_turn_and_a_react_turn_cut_mid_answer_leave_a_well_formed_history(
    settings: Settings, strict_llama: str | None, kind: str,
) -> None:
    """Holds: turn 1 fails (the upstream's stream dies after two tokens: the run fails, its
    reply ``error`` with what it said); turn 2, agent ``react``, calls a tool natively (its
    call and result are the run's, never stored in the conversation), and is cancelled while
    its answer streams (after two tokens: the reply ``cancelled`` with them); turn 3, chat.
    Turn 3's model gets ``[user turn-2 question, assistant (turn 2's partial answer), user
    turn-3 question]``: the failed turn left out with its question, no tool call or tool
    result dangling, roles alternating."""
    async with e2e(settings, kind) as env:
        env.sim.script(
            Reply(text="half an answer that dies", die_after=2),
            Reply(text="", tool_calls=({"name": "calculator",
                                        "arguments": {"expression": "6*7"}},)),
            Reply(text="The answer is forty two", hang_after=2),
            "third answer",
        )
        conv = await env.conversation()
        with trio.fail_after(GUARD):
            r = await env.client.post(f"/api/conversations/{conv}/messages",
                                      json={"content": "turn one"})
        assert r.status_code == 502, r.text
        stored = (await env.client.get(f"/api/conversations/{conv}")).json()["messages"]
        assert [m["status"] for m in stored] == ["complete", "error"], stored
        with trio.fail_after(GUARD):
            async with env.post_stream(conv, "turn two", agent="react") as response:
                stream = EventStream(response)
                events = await stream.read(
                    lambda ev: sum(e.type == "token" for e in ev) >= 2)
                assert any(e.type == "tool.result" for e in events)
                run_id = events[0].data["run_id"]
                r = await env.client.post(f"/api/runs/{run_id}/cancel")
                assert r.status_code == 202, r.text
                await stream.read()
        result = await _ask(env, conv, "turn three")
        assert result["run"]["status"] == "succeeded", result
        third = env.sim.streams[-1].body["messages"]
        assert [m["role"] for m in third] == ["user", "assistant", "user"], third
        assert third[0]["content"] == "turn two"
        assert third[1]["content"].startswith("The answer")
        assert third[2]["content"] == "turn three"
        assert not any(m.get("tool_calls") for m in third)
        assert await _refusal(strict_llama, env.sim.streams[-1].body) == ""


# -- 7. on llama.cpp's real server, with a strict template ------------------------------------


@pytest.mark.parametrize("agent", ["react", "plan_execute"])
async def test_on_llama_cpp_with_gemmas_template_a_system_prompt_fails_every_react_run(
    settings: Settings, strict_llama: str | None, agent: str,
) -> None:
    """The first defect end to end on llama.cpp's real server (xllamacpp, ``--jinja``, the
    tiny model with Gemma 3's chat template; no simulator). Client: ``POST
    /api/conversations {"system": "Answer briefly.", "agent": A}``, then ``POST
    .../messages {"content": "hello"}``. The same message with the ``chat`` agent is
    answered (checked first). With ``react`` the first call's ``[system, system, user]`` is
    refused (400 "Conversation roles must alternate", raised by the template), the retry
    without tools too, and the run fails: every message of a conversation with a system prompt
    fails under ``react`` (and under ``auto`` when it picks it); with ``plan_execute`` the
    planner's call is refused the same way. Likely spots: service/agents/react.py
    ``ReActAgent.run``, service/agents/plan_execute.py ``PlanExecuteAgent.make_plan``."""
    if strict_llama is None:
        pytest.skip("needs the embedded extra (xllamacpp, gguf)")
    conf = settings.model_copy(update={"backend": BackendKind("llamacpp"),
                                       "llamacpp_url": strict_llama})
    async with running_server(conf, from_settings=True) as server, server.client() as c:
        c.timeout = httpx.Timeout(120)
        conv = (await c.post("/api/conversations", json={
            "system": "Answer briefly.", "agent": agent})).json()["id"]
        with trio.fail_after(120):
            r = await c.post(f"/api/conversations/{conv}/messages",
                             json={"content": "hello", "agent": "chat"})
        assert r.status_code == 200, r.text
        assert r.json()["run"]["status"] == "succeeded", r.text
        with trio.fail_after(120):
            r = await c.post(f"/api/conversations/{conv}/messages", json={"content": "hello"})
        assert r.status_code == 200, r.text
        assert r.json()["run"]["status"] == "succeeded", r.text
