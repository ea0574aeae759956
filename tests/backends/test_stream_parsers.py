"""Property tests: the NDJSON and SSE readers give the same items whatever the byte boundaries."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.backends.stream_parsers import (
    LineTooLong,
    NDJSONSplitter,
    SSEComment,
    SSEEvent,
    SSEParser,
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (any order, duplicates allowed)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@given(
    objs=st.lists(json_values, max_size=8),
    crlf=st.booleans(),
    final_newline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_ndjson_any_split(objs: list, crlf: bool, final_newline: bool, cuts: list[int]) -> None:
    eol = b"\r\n" if crlf else b"\n"
    body = eol.join(json.dumps(o).encode() for o in objs)
    if objs and final_newline:
        body += eol
    splitter = NDJSONSplitter()
    lines: list[bytes] = []
    for piece in split_at(body, cuts):
        lines.extend(splitter.feed(piece))
    last = splitter.flush()
    if last is not None:
        lines.append(last)
    assert [json.loads(line) for line in lines] == objs


def test_ndjson_blank_lines_skipped_and_partial_kept() -> None:
    s = NDJSONSplitter()
    assert s.feed(b'{"a":1}\n\n  \n{"b"') == [b'{"a":1}']
    assert s.feed(b":2}") == []
    assert s.feed(b"\n") == [b'{"b":2}']
    assert s.flush() is None


def test_ndjson_line_too_long() -> None:
    s = NDJSONSplitter(max_line=10)
    s.feed(b"0123456789")
    with pytest.raises(LineTooLong):
        s.feed(b"x")


# SSE: generate items, encode them with one line-ending style, split anywhere, parse back.
field_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\0"),
    max_size=12,
)
sse_events = st.builds(
    lambda lines, event, id_: ("event", lines, event, id_),
    st.lists(field_text, min_size=1, max_size=3),
    st.sampled_from(["", "message", "update"]),
    st.none() | field_text,
)
sse_comments = st.builds(lambda text: ("comment", text), field_text)


def encode(items: list[tuple], eol: str) -> tuple[bytes, list[object]]:
    out: list[str] = []
    expected: list[object] = []
    last_id: str | None = None
    for item in items:
        if item[0] == "comment":
            out.append(f": {item[1]}{eol}")
            expected.append(SSEComment(item[1]))
            continue
        _, lines, event, id_ = item
        if event:
            out.append(f"event: {event}{eol}")
        if id_ is not None:
            out.append(f"id: {id_}{eol}")
            last_id = id_
        out.extend(f"data: {line}{eol}" for line in lines)
        out.append(eol)
        expected.append(SSEEvent(data="\n".join(lines), event=event or "message", id=last_id))
    return "".join(out).encode(), expected


@given(
    items=st.lists(sse_events | sse_comments, max_size=8),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0), max_size=16),
)
def test_sse_any_split(items: list[tuple], eol: str, cuts: list[int]) -> None:
    body, expected = encode(items, eol)
    parser = SSEParser()
    got: list[object] = []
    for piece in split_at(body, cuts):
        got.extend(parser.feed(piece))
    assert got == expected


@given(cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_sse_openai_stream_any_split(cuts: list[int]) -> None:
    body = (
        b": keep-alive\n\n"
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
        b"data:no-space\n\n"
        b"event: ping\ndata\n\n"  # "data" without a colon is an empty data line
        b"retry: 300\ndata: [DONE]\n\n"
    )
    parser = SSEParser()
    got = [item for piece in split_at(body, cuts) for item in parser.feed(piece)]
    assert got == [
        SSEComment("keep-alive"),
        SSEEvent('{"choices":[{"delta":{"content":"Hi"}}]}'),
        SSEEvent("no-space"),
        SSEEvent("", event="ping"),
        SSEEvent("[DONE]", retry=300),
    ]


def test_sse_event_without_data_is_dropped_and_unknown_fields_ignored() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: x\nfoo: bar\n\ndata: y\n\n") == [SSEEvent("y")]


def test_sse_split_crlf_counts_once() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == [SSEEvent("a")]
    assert parser.feed(b"\n") == []


def test_sse_line_too_long() -> None:
    parser = SSEParser(max_line=8)
    with pytest.raises(LineTooLong):
        parser.feed(b"data: 0123456789")


def test_llamacpp_error_line_is_an_error_event() -> None:
    # llama.cpp's server sends an error in a stream as an ``error: {json}`` line (not an SSE
    # field), then ``data: [DONE]``: it was dropped, and the upstream's message lost.
    body = (b'error: {"code":400,"message":"the request exceeds the available context size",'
            b'"type":"exceed_context_size_error"}\n\ndata: [DONE]\n\n')
    items = SSEParser().feed(body)
    assert [(i.event, i.data) for i in items if isinstance(i, SSEEvent)] == [
        ("error", body[7:body.index(b"\n")].decode()), ("message", "[DONE]")]


def test_text_joiner_joins_split_surrogate_pairs_and_replaces_lone_halves() -> None:
    from service.text import TextJoiner, clean_text

    joiner = TextJoiner()
    pieces = [joiner.feed(p) for p in ("smile \ud83d", "\ude00 ok", "x\udc00y", "end \ud800")]
    assert pieces == ["smile ", "\U0001f600 ok", "x\ufffdy", "end "]
    assert joiner.flush() == "\ufffd"
    assert joiner.flush() == ""
    assert clean_text("a\ud83d\ude00b\ud800") == "a\U0001f600b\ufffd"
    assert clean_text("plain") == "plain"
    # NUL is valid JSON but not storable text (PostgreSQL): replaced, as a lone half is.
    assert TextJoiner().feed("a\x00b") == clean_text("a\x00b") == "a\ufffdb"
    assert clean_text("\x00\ud800") == "\ufffd\ufffd"


@given(st.lists(st.text(alphabet=st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010)
                        | st.characters(max_codepoint=0x7F), max_size=8), max_size=8))
def test_text_joiner_output_always_encodes_as_utf8(pieces: list[str]) -> None:
    from service.text import TextJoiner

    joiner = TextJoiner()
    out = "".join(joiner.feed(p) for p in pieces) + joiner.flush()
    out.encode("utf-8")  # no lone surrogate left
    assert "\x00" not in out  # nor NUL (PostgreSQL's text cannot hold it)
    if not any("\ud800" <= ch <= "\udfff" for p in pieces for ch in p):
        assert out == "".join(pieces).replace("\x00", "\ufffd")
