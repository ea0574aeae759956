"""Review of the changes of 2026-12-06 (922d922..HEAD): each test fails on HEAD because of the
defect its docstring names.

ReAct text protocol (service/agents/react_parser.py: the new ``_LABEL`` with its conditional
group, ``_unfenced``'s code-fence masking), the upstream status mapping (service/backends/
http.py: a 500 read as a context error), and the chat page (service/web/markdown.js,
chat.js: links, emphasis, the conversation list).
"""

from __future__ import annotations

from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from service.backends.auto import AutoBackend
from service.backends.ollama import OllamaBackend
from service.backends.openai_compat import OpenAICompatBackend
from service.runs import RunStatus
from service.settings import Settings
from service.sim import Reply as SimReply
from service.sim import Simulator

from .agents.test_agents import TOOLS
from .backend_helpers import BUDGETS, mock_client, req
from .clients.test_chat_page import CHROMIUM, _in_browser, _send
from .e2e import e2e
from .fakes import Reply, ScriptedBackend, supervisor_env
from .servers import running_server

GUARD = 60


# -- ReAct: code-fence masking (_unfenced) ------------------------------------------------------


async def test_react_input_fenced_on_its_label_line_keeps_the_made_up_observation_in_history(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    """Models very often open the input's fence on the label's own line: ``Action Input:
    ```json`` / the JSON / a closing ```` ``` ````. ``_FENCED`` only sees a fence at a line's
    start, so it takes that *closing* fence for an opening one that is never closed and blanks
    everything after it to the end of the turn. What the model ran on to after its action (a
    made-up ``Observation: 41``, a thought and ``Final Answer: 41`` drawn from it) is then
    invisible to ``up_to_the_action``, and the whole fabrication goes back to the model as its
    own previous turn: the next call reads an observation that never happened (41, while the
    calculator said 42) and may answer from it. Before the change the turn was cut at its
    ``Observation:`` (as ``up_to_the_action``'s docstring promises). Expected: the assistant
    message given back to the model ends with the action's input."""
    turn = ("Thought: I will compute it.\nAction: calculator\n"
            "Action Input: ```json\n{\"expression\": \"6*7\"}\n```\n"
            "Observation: 41\nThought: I now know the answer.\nFinal Answer: 41")
    backend = ScriptedBackend([Reply(turn), Reply("Thought: checked.\nFinal Answer: 42")])
    with trio.fail_after(GUARD):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, _ = await env.run_to_end("what is 6*7?", "react")
    assert handle.status is RunStatus.succeeded
    calls = [e.data for e in events if e.type == "tool.call"]
    assert [c["name"] for c in calls] == ["calculator"], calls
    second = backend.streams[1].request.messages
    told = [m.content for m in second if m.role == "assistant"]
    assert told
    assert all("Observation: 41" not in t and "Final Answer: 41" not in t
                        for t in told), (
        f"the model is shown its made-up observation as its own turn: {told!r}")


@pytest.mark.parametrize("turn", [
    pytest.param("Here is my next step:\n```\nThought: I need to compute 6*7.\n"
                 "Action: calculator\nAction Input: {\"expression\": \"6*7\"}\n```",
                 id="preamble-then-fenced-protocol"),
    pytest.param("Thought: I need to compute 6*7.\n```\nAction: calculator\n"
                 "Action Input: {\"expression\": \"6*7\"}\n```",
                 id="thought-then-fenced-action"),
])
async def test_react_a_protocol_step_in_a_fence_is_still_a_tool_call(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, turn: str,
) -> None:
    """Small models often wrap their protocol step in a code fence, with a line before it
    ("Here is my next step:") or their Thought outside it. ``_unfenced`` now blanks every
    fenced block before labels are searched, and only keeps the text as it is when the turn is
    *all* one fence: with one line outside, the Action is invisible, the turn has no action,
    and ``parse_react`` returns the whole raw protocol text (backticks, "Action:",
    "Action Input: {...}") as the run's final answer. The user gets the model's scaffolding
    instead of an answer, and the tool never runs. Before the change both turns were a
    calculator call. Expected: the calculator is called and the run answers 42."""
    backend = ScriptedBackend([Reply(turn), Reply("Thought: done.\nFinal Answer: 42")])
    with trio.fail_after(GUARD):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, events, messages = await env.run_to_end("what is 6*7?", "react")
    assert handle.status is RunStatus.succeeded
    calls = [e.data["name"] for e in events if e.type == "tool.call"]
    assert calls == ["calculator"], (
        f"no tool call; the answer stored is {messages[1].content!r}")
    assert messages[1].content == "42", messages[1].content


# -- ReAct: the label regex (_LABEL) ------------------------------------------------------------


@pytest.mark.parametrize(("turn", "answers"), [
    # A bullet list written with "*": the bullet is taken for a bold label's opening stars, so
    # the conditional group eats the answer's own "**" after the colon.
    pytest.param("Thought: easy.\n* Final Answer: **42**", ("**42**", "42"), id="star-bullet"),
    # Underscore bold: the label admits "__" before the name and before the colon, but not
    # after it: the closing "__" stays at the start of the answer.
    pytest.param("Thought: easy.\n__Final Answer:__ 42", ("42",), id="underscore-bold"),
])
async def test_react_a_styled_final_answer_label_leaves_no_marker_in_the_answer(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, turn: str,
    answers: tuple[str, ...],
) -> None:
    """The new ``_LABEL`` eats stars after the colon only when a bold label opened before the
    name (``(?P<bold>\\*+)?`` ... ``(?(bold)[ \\t]*\\**)``), so that ``Final Answer: **42**``
    keeps its markers. Two label styles still leave half a marker in the stored answer:
    ``* Final Answer: **42**`` (a "*" bullet, as models write lists, is read as an opened bold,
    so the answer's opening ``**`` is eaten: ``42**``), and ``__Final Answer:__ 42`` (the
    closing ``__`` is never eaten: ``__ 42``). The message event, the stored reply and /v1 show
    broken Markdown (the page renders a stray ``**`` or ``__``). Expected: the answer with
    its own markers whole, or none."""
    backend = ScriptedBackend([Reply(turn)])
    with trio.fail_after(GUARD):
        async with supervisor_env(tmp_path, backend, tools=TOOLS) as env:
            handle, _, messages = await env.run_to_end("what is 6*7?", "react")
    assert handle.status is RunStatus.succeeded
    assert messages[1].content in answers, f"stored answer: {messages[1].content!r}"


# -- tools: text_stats ---------------------------------------------------------------------------


def test_text_stats_counts_a_page_break_as_no_line_break() -> None:
    """text_stats now counts ``len(text.splitlines())``, "as wc -l and editors count". But
    ``str.splitlines`` also breaks at a form feed, ``\\x0b``, ``\\x1c``-``\\x1e``, ``\\x85``,
    U+2028 and U+2029, none of which ends a line for wc -l or an editor. Text extracted from a
    PDF (pdftotext puts a form feed before each page's first line) is counted one line too
    many per page: "last line of page one\\n\\ffirst line of page two\\n" is 2 lines for wc
    -l and for an editor, 3 for the tool, and the model reports the wrong count as fact.
    Expected: 2 (lines end at "\\n", "\\r\\n" or "\\r" only)."""
    from service.tools import builtin

    stats = builtin.text_stats.fn("last line of page one\n\ffirst line of page two\n")
    assert stats["lines"] == 2, stats


# -- upstream status mapping: a 500 read as the prompt's fault ---------------------------------


async def test_a_server_fault_500_that_mentions_the_context_is_failed_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``error_from_status`` now maps a **500** whose words match
    ``ContextLengthExceeded._WORDS`` (``exceeds? .{0,60} context``) to 400
    ``context_length_exceeded``, the request's fault, which the auto/fleet router raises at once
    without trying the next member. For a 4xx the status said "your request"; a 500 is the
    server's own failure, and the words alone are loose: a server that cannot allocate its
    KV cache ("the KV cache for 32768 tokens exceeds free GPU memory; lower the context size")
    fails every prompt, short or long. The user's short question gets "400: your prompt is too
    long" although a healthy member stands next to it, and the sick member is never counted
    toward its cool-down. Expected: the 500 is a server error, failed over to member b, which
    answers."""
    a_sim = Simulator(default=SimReply(
        status=500, error="llama runner: the KV cache for 32768 tokens exceeds free GPU memory; "
                          "lower the context size (num_ctx)"))
    b_sim = Simulator(default=SimReply(text="from b"))
    a = OllamaBackend("a", "http://a", mock_client(a_sim), BUDGETS)
    b = OpenAICompatBackend("b", "http://b", mock_client(b_sim), BUDGETS)
    auto = AutoBackend([a, b], failure_threshold=3, cooldown=30.0)
    text = ""
    with trio.fail_after(GUARD):
        async with auto.stream(req("hi")) as chunks:
            async for chunk in chunks:
                text += chunk.text
    assert "from b" in text


# -- auto/fleet: a member "busy" only because its calls are stuck -------------------------------


async def test_a_member_whose_slots_are_held_by_stalled_calls_still_cools_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """06ddca2 exempts every ``BackendBusy`` from the cool-down count ("it is serving, not
    failing"). But a member's slots also stay taken when its upstream has stalled: the server
    took the request and sends nothing (a wedged GPU, a model load that never ends). Its one
    slot is then held by a call that waits out its whole first-chunk budget (60 s here, the
    default SERVICE_LLM_IDLE_TIMEOUT), and every other call first waits out the queue
    (SERVICE_BACKEND_QUEUE_TIMEOUT, 30 s by default; 1 s here) before going to the healthy
    member. Before the change three such waits put it aside and the next calls went straight
    to b; now every call pays the full queue wait for as long as the stall lasts, since
    ``BackendBusy`` is never counted, whatever holds the slots. Expected: once
    ``failure_threshold`` calls were turned away while no call on the member had even begun
    to answer, it is cooled down and later calls reach b without a queue wait."""
    from service.backends.http import Budgets
    from service.backends.interceptor import Interceptor
    from service.metrics import METRICS

    budgets = Budgets(connect=3.0, first_chunk=60.0, gap=5.0, call=100.0)
    a_sim = Simulator(default=SimReply(text="from a", hang_after=0))  # headers, then nothing
    b_sim = Simulator(default=SimReply(text="from b"))
    a = Interceptor(OllamaBackend("a", "http://a", mock_client(a_sim, budgets), budgets), None,
                    METRICS, concurrency=1, queue_timeout=1.0)
    b = Interceptor(OpenAICompatBackend("b", "http://b", mock_client(b_sim, budgets), budgets),
                    None, METRICS, concurrency=4, queue_timeout=1.0)
    auto = AutoBackend([a, b], failure_threshold=3, cooldown=30.0)

    async def answer() -> str:
        text = ""
        async with auto.stream(req()) as chunks:
            async for chunk in chunks:
                text += chunk.text
        return text

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            async def stalled() -> None:  # takes a's only slot; its upstream never answers
                with suppress(Exception):  # (its own first-chunk timeout, later)
                    await answer()

            nursery.start_soon(stalled)
            await trio.sleep(0.5)
            assert auto.in_flight(a) == 1
            for _ in range(3):  # each waits a's queue out (1 s), then b answers
                assert "from b" in await answer()
            started = trio.current_time()
            for _ in range(3):
                assert "from b" in await answer()
            waited = trio.current_time() - started
            status = auto.member_status(a)
            nursery.cancel_scope.cancel()
    assert waited < 1.0, (
        f"three more calls waited {waited:g} s in the stalled member's queue; a: {status}")


# -- the chat page (real chromium; tests/clients/test_chat_page.py's helpers) -------------------

browser = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def _answer_html(url: str, page: Any) -> dict[str, Any]:
    from playwright.sync_api import expect

    page.goto(url + "/")
    answer = _send(page, "question")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    body = answer.locator(".answer")
    return {"html": body.inner_html(), "text": body.inner_text(),
            "links": body.evaluate("""(el) => [...el.querySelectorAll('a')].map(
                (a) => ({href: a.href, text: a.textContent, html: a.innerHTML}))"""),
            "em": body.locator("em").all_inner_texts()}


async def _page_shows(settings: Settings, text: str) -> dict[str, Any]:
    with trio.fail_after(GUARD):
        async with e2e(settings, "llamacpp") as env:
            env.sim.script(SimReply(text=text))
            return await _in_browser(partial(_answer_html, env.server.url))


@pytest.mark.slow
@browser
async def test_page_a_link_whose_text_is_code_shows_its_text(settings: Settings) -> None:
    """Models link package and API names with their names as code: ``See
    [`requests`](https://pypi.org/project/requests/)``. ``inline`` in markdown.js now keeps
    code spans *and then* links as placeholders (``\\u0000N\\u0000``) and puts them back in
    one pass: the link's kept HTML holds the code span's placeholder, which that pass does
    not revisit. The link's text is the raw placeholder (NUL, "0", NUL; the browser drops the
    NULs), not ``requests``: the user reads "See 0 for the docs." with a link on a stray "0".
    Before the change the link showed <code>requests</code>. Expected: the link's text is
    ``requests``, in code."""
    seen = await _page_shows(
        settings, "See [`requests`](https://pypi.org/project/requests/) for the docs.")
    assert [link["text"] for link in seen["links"]] == ["requests"], (
        f"the link shows {[link['text'] for link in seen['links']]!r}: {seen['html']!r}")
    assert "<code>requests</code>" in seen["links"][0]["html"], seen["html"]


@pytest.mark.slow
@browser
async def test_page_a_bold_link_text_is_bold_not_asterisks(settings: Settings) -> None:
    """``[**Download the installer**](https://example.com/get)``: a bold link, common in a
    model's call to action. The link rule now runs before emphasis and keeps the link's HTML
    (its label included) out of the emphasis rules, so the label's ``**`` are shown as
    typed: the user reads "**Download the installer**" with its asterisks. Before the change
    it was bold. Only the URL needed protecting from emphasis, not the label. Expected: the
    link's text is "Download the installer", in <strong>, no asterisks."""
    seen = await _page_shows(settings, "[**Download the installer**](https://example.com/get)")
    assert [link["text"] for link in seen["links"]] == ["Download the installer"], (
        f"the link shows {[link['text'] for link in seen['links']]!r}: {seen['html']!r}")


@pytest.mark.slow
@browser
async def test_page_emphasis_inside_a_word_is_still_emphasis(settings: Settings) -> None:
    """"the *n*th term" (maths answers write it all the time) or "*un*believable". The new
    italic rule requires a non-word character before the opening ``*`` and after the closing
    one (``(^|[^*\\w])`` ... ``(?![*\\w])``), stricter than the CommonMark flanking rules the
    commit cites: for ``*`` (unlike ``_``) CommonMark emphasises inside words
    (``*n*th`` is <em>n</em>th). The page now shows the asterisks: "the *n*th term". Before
    the change it was italic. Expected: "n" in <em>, no asterisks shown."""
    seen = await _page_shows(settings, "So the *n*th term is 2n + 1.")
    assert seen["em"] == ["n"], f"the page shows {seen['text']!r}: {seen['html']!r}"
    assert "*" not in seen["text"], seen["text"]


def _continue_an_older_conversation(url: str, page: Any) -> dict[str, Any]:
    from playwright.sync_api import expect

    page.goto(url + "/")
    convs = page.get_by_test_id("conversation")
    expect(convs).to_have_count(100)
    page.get_by_test_id("older-conversations").click()
    expect(convs).to_have_count(101)
    page.get_by_test_id("conversation").filter(has_text="the oldest one").click()
    expect(page.get_by_test_id("user-message")).to_have_text(["first words"])
    _send(page, "and now?")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    page.wait_for_timeout(500)  # the list reloaded after the run
    return {"titles": convs.all_inner_texts(),
            "current": page.locator("#conversations [aria-current=true]").all_inner_texts()}


@pytest.mark.slow
@browser
async def test_page_a_conversation_continued_from_older_ones_stays_in_the_list(
    settings: Settings,
) -> None:
    """A user with more than 100 conversations clicks "Older conversations", opens one of
    them and asks something. After the run ``send()`` reloads the list to put the conversation
    just used first (``loadConversations()``), but that reload fetches the *first page only*,
    and pages are by creation (the service's ``seq``), not by use: the conversation just
    continued, created long ago, is not on it. It drops out of the list while it is still the
    one on screen (no entry marked current), with every older page the user had loaded; to
    find it again they must page back. Expected: the conversation just continued is listed
    first, marked current."""
    backend = ScriptedBackend(lambda r: Reply("ok"))
    async with running_server(settings, backend) as srv, srv.client() as client:
        with trio.fail_after(GUARD):
            oldest = (await client.post("/api/conversations",
                                        json={"title": "the oldest one"})).json()["id"]
            r = await client.post(f"/api/conversations/{oldest}/messages",
                                  json={"content": "first words"})
            assert r.status_code == 200, r.text
            for i in range(100):
                r = await client.post("/api/conversations", json={"title": f"newer {i}"})
                assert r.status_code == 201, r.text
            seen = await _in_browser(partial(_continue_an_older_conversation, srv.url))
    where = (f"after the run the list holds {len(seen['titles'])} conversations, first "
             f"{seen['titles'][:2]}, current {seen['current']}")
    assert seen["titles"][:1] == ["the oldest one"], where
    assert seen["current"] == ["the oldest one"], where
