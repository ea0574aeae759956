"""The ReAct text-protocol parser: examples from real model drift, and properties."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.agents.react_parser import InvalidInput, answer_so_far, parse_react


def test_plain_action() -> None:
    step = parse_react('Thought: compute\nAction: calculator\nAction Input: {"expression": "1+1"}')
    assert (step.thought, step.action, step.action_input) == (
        "compute", "calculator", {"expression": "1+1"})
    assert not step.is_final


def test_final_answer() -> None:
    step = parse_react("Thought: I know\nFinal Answer: 42 is the answer.\nIt is.")
    assert step.final_answer == "42 is the answer.\nIt is."


def test_bold_labels_fences_and_chatter() -> None:
    text = (
        "**Thought:** let me check\n**Action:** `calculator`\n**Action Input:**\n```json\n"
        '{"expression": "2*3"}\n```\nObservation: (made up by the model)'
    )
    step = parse_react(text)
    assert step.action == "calculator"
    assert step.action_input == {"expression": "2*3"}


def test_json_followed_by_chatter_and_bare_string_input() -> None:
    step = parse_react('Action: search\nAction Input: {"q": "x"} and then I will see')
    assert step.action_input == {"q": "x"}
    step = parse_react('action: text_stats\naction input: "hello world"')
    assert (step.action, step.action_input) == ("text_stats", "hello world")


def test_call_syntax_and_input_on_next_line() -> None:
    assert parse_react("Action: calculator(2+2)").action_input == "2+2"
    step = parse_react('Action: calculator\n{"expression": "3"}')
    assert step.action_input == {"expression": "3"}


def test_first_of_action_and_final_wins() -> None:
    step = parse_react("Final Answer: done\nAction: calculator\nAction Input: {}")
    assert step.is_final
    assert (step.final_answer or "").startswith("done")
    step = parse_react("Action: calculator\nAction Input: {}\nFinal Answer: too early")
    assert step.action == "calculator"


def test_no_labels_is_the_answer() -> None:
    assert parse_react("  Just an answer.  ").final_answer == "Just an answer."


labels = st.sampled_from(["Thought:", "Action:", "Action Input:", "Final Answer:", "Observation:",
                          "**Action:**", "action input:", "\n", "{", "}", "```"])
text = st.lists(st.one_of(labels, st.text(max_size=20)), max_size=12).map("".join)


@given(text)
def test_never_raises_and_always_decides(t: str) -> None:
    step = parse_react(t)
    assert step.is_final or (step.action is not None and step.action != "")


@given(
    st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True),
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True),
                    st.one_of(st.integers(), st.text(max_size=10), st.booleans()), max_size=4),
    st.text(alphabet=st.characters(blacklist_characters=":\n", blacklist_categories=("Cs",)),
            max_size=30),
)
def test_round_trip_of_well_formed_actions(name: str, args: dict, thought: str) -> None:  # type: ignore[type-arg]
    t = f"Thought: {thought}\nAction: {name}\nAction Input: {json.dumps(args)}"
    step = parse_react(t)
    assert step.action == name
    assert step.action_input == args


def test_action_final_answer_with_an_input_is_the_answer() -> None:
    # LangChain's style. Found in a review of the "Action: None" fix, which had lost it.
    step = parse_react("Thought: I know it now.\nAction: Final Answer\nAction Input: 4")
    assert (step.action, step.final_answer) == (None, "4")


def test_action_none_alone_stays_a_call_the_model_can_correct() -> None:
    # Only before a Final Answer is "Action: None" no action; alone, the thought is not the
    # answer (the failing call's observation lets the model correct itself).
    step = parse_react("Thought: I need to look this up first.\nAction: None\nAction Input: {}")
    assert (step.action, step.final_answer) == ("None", None)
    step = parse_react("Thought: I know this.\nAction: None\nFinal Answer: Paris")
    assert (step.action, step.final_answer) == (None, "Paris")


def test_a_python_style_action_input_is_read_as_its_arguments() -> None:
    # Small models often write a Python dict for JSON; it was taken as a text and failed the
    # tool's schema, step after step (suspected by the agents review).
    step = parse_react("Action: calculator\nAction Input: {'expression': '2+2'}")
    assert step.action_input == {"expression": "2+2"}
    # Only literals, of JSON-like values, with text keys: anything else stays text.
    for raw in ("{'a': {1, 2}}", "{1: 'x'}", "{'a': __import__('os').getcwd()}",
                "{'a': '" + "x" * 20_000 + "'}"):
        assert parse_react(f"Action: calculator\nAction Input: {raw}").action_input == raw


@pytest.mark.parametrize(("text", "first", "native", "kept"), [
    # Cut after its label: what follows "Final Answer:".
    ("Thought: easy.\nFinal Answer: 4 is", True, False, "4 is"),
    # No label at all: a plain answer, as shown.
    ("The answer is ", True, False, "The answer is "),
    # A thought or a call in progress: no answer yet.
    ("Thought: I need the calc", True, False, ""),
    ("Action: calculator\nAction Input: {\"expr", True, False, ""),
    # A first turn's prose "Action:" (no thought, words with spaces, no input): the answer,
    # as the whole turn would have been taken.
    ("Summary:\n- **Action:** rotate the ", True, False, "Summary:\n- **Action:** rotate the "),
    # ... but not in a later turn, where the loop reads it as the protocol's.
    ("Summary:\n- **Action:** rotate the ", False, False, ""),
    # After native tool calls, the model's text is its answer, labels or not.
    ("Thought: done, so ", False, True, "Thought: done, so "),
])
def test_a_cut_turn_keeps_what_the_whole_turn_would_have_answered(
    text: str, first: bool, native: bool, kept: str,
) -> None:
    assert answer_so_far(text, tools={"calculator"}, first=first, native=native) == kept


def test_a_cut_answer_given_as_an_answer_actions_input_is_kept() -> None:
    cut = "Thought: I know it.\nAction: Final Answer\nAction Input: The capital of France is Par"
    assert answer_so_far(cut) == "The capital of France is Par"
    # ... but a thought alone is still no answer, nor a call of a tool.
    assert answer_so_far("Thought: I know it, so") == ""
    assert answer_so_far('Action: calculator\nAction Input: {"expression": "2+') == ""


@pytest.mark.parametrize(("text", "answer"), [
    ("**Final Answer:** 42", "42"),  # the label's bold closes after its colon
    ("**Final Answer**: **42**", "**42**"),  # ... or before it: the answer keeps its own
    ("Final Answer: **42**", "**42**"),
    ("Final Answer\uff1a42", "42"),  # a full-width colon
    ("> Thought: hmm\n> Final Answer: 7", "7"),
])
def test_label_styles_leave_the_answers_own_markup(text: str, answer: str) -> None:
    assert parse_react(text).final_answer == answer


def test_labels_inside_code_fences_are_code_unless_the_whole_turn_is_fenced() -> None:
    yaml = "Here:\n```yaml\nStatement:\n  Action: s3:GetObject\n```\nDone."
    assert parse_react(yaml, tools=["calculator"]).final_answer == yaml
    fenced = '```\nThought: x\nAction: calculator\nAction Input: {"expression": "2+2"}\n```'
    step = parse_react(fenced, tools=["calculator"])
    assert (step.action, step.action_input) == ("calculator", {"expression": "2+2"})
    code = 'Thought: run it\nAction: python\nAction Input:\n```json\n{"code": "Action: x"}\n```'
    step = parse_react(code, tools=["python"])
    assert (step.action, step.action_input) == ("python", {"code": "Action: x"})


def test_a_json_input_with_trailing_commas_is_read_and_a_broken_one_is_marked() -> None:
    step = parse_react('Action: text_stats\nAction Input: {"text": "a b c", }')
    assert step.action_input == {"text": "a b c"}
    # Outside its strings only, escapes included.
    raw = '{"text": "[0-9,] \\" ,}", "n": [1, 2,],}'
    assert parse_react(f"Action: t\nAction Input: {raw}").action_input == {
        "text": '[0-9,] " ,}', "n": [1, 2]}
    step = parse_react('Action: text_stats\nAction Input: {"text": "a b c"')
    assert isinstance(step.action_input, InvalidInput)
    assert step.action_input == '{"text": "a b c"'


@pytest.mark.parametrize(("text", "answer"), [
    # The model ran on into a cycle it made up (a call, another final answer): the answer
    # ends where it led into it.
    ("Final Answer: 4\nObservation: the user is satisfied\nThought: check it\n"
     'Action: calculator\nAction Input: {"expression": "2+2"}', "4"),
    ("Final Answer: 4\nThought: sure?\nFinal Answer: 4, sure", "4"),
    # Labels without a cycle after them are the answer's: a report's, a quoted log's.
    ("Final Answer: 4\nObservation: the user is satisfied",
     "4\nObservation: the user is satisfied"),
    ("Final Answer: Do this:\n- **Action:** restart the server\n- **Thought:** it is safe",
     "Do this:\n- **Action:** restart the server\n- **Thought:** it is safe"),
    ("Final Answer: Found:\n- **Observation:** disk full\n> Observation: refused\n"
     "- **Action:** rotate\n  Action Input: none", "Found:\n- **Observation:** disk full\n"
     "> Observation: refused\n- **Action:** rotate\n  Action Input: none"),
])
def test_a_final_answer_ends_where_the_model_ran_on(text: str, answer: str) -> None:
    assert parse_react(text).final_answer == answer
    assert answer_so_far(text) == answer
