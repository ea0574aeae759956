"""Review (2026-12-07 z): the chat page's Markdown renderer (service/web/markdown.js) against
hostile model output, in a real browser: markup, event handlers and script URLs must never
reach the DOM, whatever the payload (obfuscated schemes, attribute break-outs, code spans,
tables, headings, lists, entities, NULs, bidi controls), rendered at once or streamed token by
token through the real page; and no input may hang the tab.

The real app on 127.0.0.1:0 (tests/servers.py) serves the page; the renderer is the page's own
``/assets/markdown.js``, imported inside it and its HTML put into the document as chat.js does
(a ``<template>``'s content appended). The renderer tests run with the page's CSP bypassed, so
that an injected handler *would* run and trip the ``window.__pwned`` traps (the CSP is a second
line; the renderer is meant to hold on its own); the streamed test keeps the real CSP and also
counts ``securitypolicyviolation`` events (a blocked inline handler would raise one). Debian's
chromium through Playwright (tests/clients/test_chat_page.py's setup); every request to another
host is aborted, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import pytest
import trio

from service.backends.base import ChatRequest
from service.settings import Settings

from ..fakes import Reply, ScriptedBackend
from ..servers import running_server
from .test_chat_page import CHROMIUM, WAIT_MS

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]

T = TypeVar("T")
expect = playwright.expect
GUARD = 120  # seconds a whole test may take (a browser start included)
SLOW_RENDER_S = 10.0  # one render of the answer slower than this hangs the tab

# --- in-page helpers -------------------------------------------------------------------------

# Traps (alert & co., a global a payload would call) and the checker of what a render put in
# the document: tags, attributes and link targets the renderer may produce, nothing else.
_SETUP = r"""
async () => {
  window.__pwned = [];
  const trap = (m) => { window.__pwned.push(String(m)); };
  window.alert = window.confirm = window.prompt = window.print = trap;
  window.pwn = trap;
  window.__violations = [];
  document.addEventListener("securitypolicyviolation",
    (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI} ${e.sample}`));
  const TAGS = new Set(["P", "BR", "H1", "H2", "H3", "H4", "H5", "H6", "HR", "UL", "OL", "LI",
    "PRE", "CODE", "STRONG", "EM", "A", "DIV", "TABLE", "THEAD", "TBODY", "TR", "TH", "TD"]);
  const ATTRS = new Set(["dir", "class", "start", "href", "rel", "target"]);
  const CLASSES = new Set(["table", "align-left", "align-right", "align-center",
    "message", "assistant", "answer", "steps", "note", "quiet"]);
  // What is wrong with one element (a list of findings; empty: fine).
  window.__badElement = (el) => {
    const bad = [];
    if (!TAGS.has(el.tagName)) bad.push(`tag ${el.tagName}`);
    for (const a of el.attributes) {
      if (/^on/i.test(a.name)) bad.push(`handler ${el.tagName} ${a.name}=${a.value}`);
      else if (!ATTRS.has(a.name)) bad.push(`attribute ${el.tagName} ${a.name}=${a.value}`);
    }
    if (el.hasAttribute("class")) {
      for (const c of el.classList) if (!CLASSES.has(c)) bad.push(`class ${c}`);
    }
    if (el.hasAttribute("href")) {
      // The browser's own parse (the property), not the attribute's text.
      if (el.tagName !== "A" || !/^https?:\/\//.test(el.href)) bad.push(`href ${el.href}`);
      let scheme = "";
      try { scheme = new URL(el.href).protocol; } catch { scheme = "(invalid)"; }
      if (!["http:", "https:", "(invalid)"].includes(scheme)) bad.push(`scheme ${scheme}`);
      const rel = el.rel.split(/\s+/);
      if (el.target !== "_blank" || !rel.includes("noopener") || !rel.includes("noreferrer")) {
        bad.push(`link ${el.outerHTML.slice(0, 200)}`);
      }
    }
    if (el.hasAttribute("start") && !/^\d+$/.test(el.getAttribute("start"))) {
      bad.push(`start ${el.getAttribute("start")}`);
    }
    return bad;
  };
  window.__badTree = (root) => [...root.querySelectorAll("*")].flatMap(window.__badElement);
  const { renderMarkdown } = await import("/assets/markdown.js");
  window.__md = renderMarkdown;
  // One payload into the document as chat.js's render() puts it (AssistantView.render).
  window.__show = (source) => {
    const box = document.createElement("div");
    box.className = "answer";
    box.dataset.testid = "review-box";
    document.body.append(box);
    const fresh = document.createElement("template");
    fresh.innerHTML = renderMarkdown(source);
    box.append(...fresh.content.children);
    return {
      bad: window.__badTree(box),
      text: box.textContent,
      nul: box.innerHTML.includes("\u0000"),
      hrefs: [...box.querySelectorAll("a")].map((a) => a.href),
    };
  };
  return true;
}
"""


@contextmanager
def _page(*, bypass_csp: bool) -> Iterator[Any]:
    """A fresh chromium page; requests to anything but 127.0.0.1 are aborted."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 700},
                                          bypass_csp=bypass_csp)

            def local_only(route: Any) -> None:
                url = route.request.url
                if url.startswith(("http://127.0.0.1:", "data:", "blob:")):
                    route.continue_()
                else:
                    route.abort()

            context.route("**/*", local_only)
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            browser.close()


async def _on_page(settings: Settings, fn: Callable[[str, Any], T], *, bypass_csp: bool = True,
                   backend: ScriptedBackend | None = None) -> T:
    def session(url: str) -> T:
        with _page(bypass_csp=bypass_csp) as page:
            page.goto(url + "/")
            page.get_by_test_id("message-input").wait_for()
            assert page.evaluate(_SETUP)
            return fn(url, page)

    with trio.fail_after(GUARD):
        async with running_server(settings, backend) as srv:
            return await trio.to_thread.run_sync(partial(session, srv.url))


def _show_all(page: Any, payloads: list[str]) -> dict[str, Any]:
    """Each payload rendered into the page; then every link hovered and clicked, and a while
    for any image's error to fire; the findings per payload, and the traps."""
    shown = page.evaluate("(ps) => ps.map((p) => window.__show(p))", payloads)
    links = page.locator("[data-testid=review-box] a")
    for i in range(min(links.count(), 60)):
        link = links.nth(i)
        link.scroll_into_view_if_needed()
        link.hover()
        link.click(modifiers=["Control"], no_wait_after=True)  # a background tab, not a popup
    page.wait_for_timeout(500)
    return {"shown": dict(zip(payloads, shown, strict=True)),
            "pwned": page.evaluate("window.__pwned"),
            "violations": page.evaluate("window.__violations")}


def _findings(seen: dict[str, Any]) -> dict[str, Any]:
    return {p: s for p, s in seen["shown"].items() if s["bad"] or s["nul"]}


# --- payloads --------------------------------------------------------------------------------

# Link and image URLs: script schemes however obfuscated, attribute break-outs, titles.
URL_PAYLOADS = [
    "[a](JaVaScRiPt:pwn(1))",
    "[a]( javascript:pwn(1))",
    "[a](\x01javascript:pwn(1))",
    "[a](java\tscript:pwn(1))",
    "[a](java\nscript:pwn(1))",
    "[a](&#106;avascript:pwn(1))",
    "[a](&#x6A;avascript&colon;pwn(1))",
    "[a](javascript&colon;pwn(1))",
    "[a](%6Aavascript:pwn(1))",
    "[a](data:text/html,<script>pwn(1)</script>)",
    "[a](data:text/html;base64,PHNjcmlwdD5wd24oMSk8L3NjcmlwdD4=)",
    "[a](vbscript:msgbox(1))",
    "[a](http://a\" onmouseover=\"pwn(1))",
    "[a](http://a' onmouseover='pwn(1))",
    "[a](http://a`onmouseover=pwn(1))",
    "[a](http://a\"onmouseover=pwn(1)//)",
    "[a](http://127.0.0.1:1/\"onmouseover=pwn(1)//)",
    "[a](http://a&quot; onmouseover=&quot;pwn(1))",
    "[a](http://a&#34;onmouseover=pwn(1)//)",
    "[a](http://a\\\" onmouseover=\\\"pwn(1))",
    "[a](http://a\\&quot;onmouseover=pwn(1)//)",
    "[a](http://a(b\"onmouseover=\"pwn(1)))",
    "[a](http://javascript:pwn(1))",
    "[a](http://127.0.0.1:1/\"><img src=x onerror=pwn(1)>)",
    "[a](http://127.0.0.1:1/ \"<img src=x onerror=pwn(1)>\")",
    "[a](http://127.0.0.1:1/ 'x' onmouseover='pwn(1)')",
    "![x](x\" onerror=\"pwn(1))",
    "![x](http://127.0.0.1:1/x.png\" onerror=\"pwn(1))",
    "![x](javascript:pwn(1))",
    "[[x](http://127.0.0.1:1/)](javascript:pwn(1))",
    "[x](http://127.0.0.1:1/)(javascript:pwn(1))",
    "[x [y](javascript:pwn(1))](http://127.0.0.1:1/)",
    "[<img src=x onerror=pwn(1)>](http://127.0.0.1:1/)",
    "[x\" onmouseover=\"pwn(1)](http://127.0.0.1:1/)",
    "<javascript:pwn(1)>",
    "<http://a\" onmouseover=\"pwn(1)>",
    "[x][r]\n\n[r]: javascript:pwn(1)",
    "[x]\n\n[x]: http://a\" onmouseover=\"pwn(1)",
    "[x](http://a\x00\" onmouseover=pwn(1))",
    "[x](http://\x000\x00)",
    "[x](https://127.0.0.1:1/\u202e\" onmouseover=pwn(1))",
    "[x](http://a\u2028\" onmouseover=pwn(1))",
    "[x](http:\\/\\/127.0.0.1:1\\/)",
    "[x](http://127.0.0.1:1/\\)\" onmouseover=\"pwn(1))",
    "[x](http://\uff02onmouseover=pwn(1))",  # a fullwidth quote
]

# Raw HTML in every block and inline construct the subset has.
HTML_PAYLOADS = [
    "`</code><img src=x onerror=pwn(1)>`",
    "``</code><img src=x onerror=pwn(1)>``",
    "```\n</code></pre><img src=x onerror=pwn(1)>\n```",
    "~~~html\n<script>pwn(1)</script>\n~~~",
    "    <script>pwn(1)</script>",
    "# <img src=x onerror=pwn(1)>",
    "###### x <svg onload=pwn(1)>",
    "Title <svg onload=pwn(1)>\n===",
    "<details open ontoggle=pwn(1)>\n---",
    "- <iframe src=javascript:pwn(1)>\n  - <object data=javascript:pwn(1)>",
    "1. <embed src=javascript:pwn(1)>\n   2. <video><source onerror=pwn(1)>",
    "99. <audio src=x onerror=pwn(1)>",
    "**<script>pwn(1)</script>**",
    "*<img src=x onerror=pwn(1)>*",
    "**a *b <img src=x onerror=pwn(1)> c* d**",
    "*a [b* c](http://127.0.0.1:1/) d*",
    "&lt;img src=x onerror=pwn(1)&gt;",
    "&amp;lt;script&amp;gt;pwn(1)&amp;lt;/script&amp;gt;",
    "&#60;img src=x onerror=pwn(1)&#62;",
    "\\<img src=x onerror=pwn(1)\\>",
    "\\&lt;img src=x onerror=pwn(1)>",
    "\\\\<img src=x onerror=pwn(1)>",
    "<math><mi xlink:href=\"javascript:pwn(1)\">x</mi></math>",
    "<svg><script>pwn(1)</script></svg>",
    "<svg><a xlink:href=\"javascript:pwn(1)\"><text y=20>x</text></a></svg>",
    "<form action=javascript:pwn(1)><button>x</button></form>",
    "<meta http-equiv=refresh content=\"0;url=javascript:pwn(1)\">",
    "<base href=javascript:pwn(1)//>",
    "<style>*{background:url(javascript:pwn(1))}</style>",
    "<link rel=stylesheet href=javascript:pwn(1)>",
    "<a href=javascript:pwn(1)>x</a>",
    "<!-- x --><img src=x onerror=pwn(1)>",
    "<![CDATA[<img src=x onerror=pwn(1)>]]>",
    "<noscript><p title=\"</noscript><img src=x onerror=pwn(1)>\">",
    "<template><img src=x onerror=pwn(1)></template>",
    "<textarea></textarea><img src=x onerror=pwn(1)>",
    "<img src=x onerror=pwn(1)//",
    "<img\tsrc=x\tonerror=pwn(1)>",
    "a\x00<img src=x onerror=pwn(1)>",
    "\x000\x00<img src=x onerror=pwn(1)>",
    "`\x000\x00`",
    "\u202e<img src=x onerror=pwn(1)>",
    "\uff1cimg src=x onerror=pwn(1)\uff1e",
]

# Tables: cells are rendered with ``<br>`` taken as a tag; everything else in them is text.
TABLE_PAYLOADS = [
    "| a | b |\n|---|---|\n| <img src=x onerror=pwn(1)> | [x](http://a\"onmouseover=pwn(1)) |",
    "| a<br onmouseover=pwn(1)> | b<br/> |\n|---|---|\n| c<br x=\"\"onclick=pwn(1)> | d |",
    "| a<br\nonmouseover=pwn(1)> |\n|---|\n| b |",
    "| a<BR/><script>pwn(1)</script> |\n|:-:|\n| `<br>` <br> |",
    "| x\\|<img src=x onerror=pwn(1)> |\n|--:|\n| \\| |",
    "| `a|b` <img src=x onerror=pwn(1)> |\n|---|\n| c |",
    "| h |\n|---|\n| [a](javascript:pwn(1)) | [b](http://127.0.0.1:1/\"><svg onload=pwn(1)>) |",
    "|<br>|\n|-|\n|&lt;br&gt;<br>&amp;lt;br&amp;gt;|",
    "| a | b |\n| :- | -: |\n| <td onclick=pwn(1)> | </table><img src=x onerror=pwn(1)> |",
    "- item\n  | a |\n  |---|\n  | <img src=x onerror=pwn(1)> |",
]


# --- tests -----------------------------------------------------------------------------------


_CONTROL = """
() => {
  const box = document.createElement("div");
  box.innerHTML = '<a href="javascript:pwn(0)" onclick="pwn(0)">y</a>'
    + '<img src="x" onerror="pwn(0)">';
  document.body.append(box);
  return window.__badTree(box);
}
"""


def _render_session(payloads: list[str], url: str, page: Any) -> dict[str, Any]:
    seen = _show_all(page, payloads)
    # The harness's controls: the checker flags injected markup, and an injected handler runs
    # (the CSP is bypassed here), so an empty finding means the renderer held.
    seen["control_bad"] = page.evaluate(_CONTROL)
    page.wait_for_function("window.__pwned.length > 0")
    seen["control_pwned"] = page.evaluate("window.__pwned")
    return seen


def _assert_controls(seen: dict[str, Any]) -> None:
    kinds = sorted(finding.split()[0] for finding in seen["control_bad"])
    assert kinds == ["attribute", "handler", "handler", "href", "link", "scheme", "tag"], kinds
    assert seen["control_pwned"] == ["0"], seen["control_pwned"]


async def test_link_urls_never_give_a_script_scheme_or_a_handler(settings: Settings) -> None:
    """Script schemes (case, leading spaces and control characters, tabs and newlines inside
    the scheme, entities, percent-encoding, data:, vbscript:), quotes of every kind closing the
    href, titles, images, nested and malformed brackets, autolinks and reference links: every
    ``<a>`` the page holds has an http(s) href as the browser parses it, rel="noopener
    noreferrer", and no handler; hovering and clicking each link runs nothing."""
    seen = await _on_page(settings, partial(_render_session, URL_PAYLOADS))
    _assert_controls(seen)
    assert _findings(seen) == {}
    assert seen["pwned"] == []
    assert seen["violations"] == []
    hrefs = [h for s in seen["shown"].values() for h in s["hrefs"]]
    assert hrefs
    assert all(h.startswith(("http://", "https://")) for h in hrefs), hrefs
    # A quote cannot end the href: it is in the URL (percent-encoded by the browser).
    assert seen["shown"]["[a](http://a\" onmouseover=\"pwn(1))"]["hrefs"] == []  # a space: text
    assert seen["shown"]["[a](http://127.0.0.1:1/\"onmouseover=pwn(1)//)"]["hrefs"] == [
        "http://127.0.0.1:1/%22onmouseover=pwn(1)//"]
    # Bidi controls in a URL are shown (and sent) as U+FFFD, not obeyed.
    assert all("\u202e" not in s["text"] for s in seen["shown"].values())


async def test_raw_html_in_every_construct_stays_text(settings: Settings) -> None:
    """Raw HTML in code spans and fences (a ``</code>`` closing early), headings (ATX and
    setext), rules, nested lists, emphasis around and across tags, entities (``&lt;``, double
    ``&amp;lt;``, numeric), backslash escapes before ``<`` and ``&``, SVG/MathML, form, meta,
    base, style, link, comments, CDATA, noscript/template/textarea parsing tricks, NULs and
    forged placeholders (the renderer's own ``\\0N\\0`` marks), fullwidth brackets: no element
    the renderer does not make, no attribute it does not set, no leftover NUL; the text shown
    holds the payload's characters."""
    seen = await _on_page(settings, partial(_render_session, HTML_PAYLOADS))
    _assert_controls(seen)
    assert _findings(seen) == {}
    assert seen["pwned"] == []
    assert seen["violations"] == []
    shown = seen["shown"]
    assert "<img src=x onerror=pwn(1)>" in shown["`</code><img src=x onerror=pwn(1)>`"]["text"]
    assert "&lt;img" in shown["&lt;img src=x onerror=pwn(1)&gt;"]["text"]  # no double decode
    assert "&amp;lt;script" in shown["&amp;lt;script&amp;gt;pwn(1)&amp;lt;/script&amp;gt;"]["text"]
    # A forged placeholder is not another payload's kept HTML: shown as U+FFFD0U+FFFD.
    assert "\ufffd0\ufffd" in shown["`\x000\x00`"]["text"]


async def test_table_cells_take_only_a_bare_br(settings: Settings) -> None:
    """Table cells: ``<br>`` (and ``<br/>``) is the one tag taken, and only bare: with an
    attribute, a newline inside, or next to other tags, it is text; escaped pipes, code spans
    with pipes, alignment rows and tables under list items change nothing of that."""
    seen = await _on_page(settings, partial(_render_session, TABLE_PAYLOADS))
    _assert_controls(seen)
    assert _findings(seen) == {}
    assert seen["pwned"] == []
    assert seen["violations"] == []
    attr_br = seen["shown"][TABLE_PAYLOADS[1]]["text"]
    assert "<br onmouseover=pwn(1)>" in attr_br
    assert "<br x=\"\"onclick=pwn(1)>" in attr_br


def _opener_session(url: str, page: Any) -> dict[str, Any]:
    page.evaluate("(u) => window.__show(`[the service](${u}/) and [x](${u}/)`)", url)
    link = page.locator("[data-testid=review-box] a").first
    with page.expect_popup() as popup_info:
        link.click()
    popup = popup_info.value
    popup.wait_for_load_state()
    return {"opener": popup.evaluate("window.opener === null"),
            "referrer": popup.evaluate("document.referrer"),
            "pwned": page.evaluate("window.__pwned")}


async def test_a_clicked_link_gets_no_opener_and_no_referrer(settings: Settings) -> None:
    """A model's link opens in a new tab with no ``window.opener`` (it cannot navigate the chat
    page: reverse tabnabbing) and no Referer (the conversation's URL does not leak)."""
    seen = await _on_page(settings, _opener_session)
    assert seen == {"opener": True, "referrer": "", "pwned": []}


def _markup_in_url_session(url: str, page: Any) -> dict[str, Any]:
    out = {}
    for source in ["[x](http://127.0.0.1:1/a`b`c)",
                   "| h |\n|---|\n| [x](http://127.0.0.1:1/a<br>c) |"]:
        out[source] = page.evaluate(
            "(s) => { const box = document.createElement('div');"
            " box.innerHTML = window.__md(s); const a = box.querySelector('a');"
            " return a && {attr: a.getAttribute('href'), href: a.href, text: box.textContent}; }",
            source)
    return out


async def test_a_code_span_or_br_in_a_link_url_stays_out_of_the_href(settings: Settings) -> None:
    """Fixed (was: DEFECT: the renderer's own markup is written into a link's href. Payloads
    ``[x](http://127.0.0.1:1/a`b`c)`` and, in a table cell, ``[x](http://127.0.0.1:1/a<br>c)``:
    the href attribute is ``http://127.0.0.1:1/a<code>b</code>c`` (resp. ``.../a<br>c``), which
    the browser resolves to ``/a%3Ccode%3Eb%3C/code%3Ec`` (a path with a made-up ``/code>``
    segment) instead of the URL as written (CommonMark: ``/a%60b%60c``; ``/a%3Cbr%3Ec``).
    service/web/markdown.js line 27 (code spans) and line 28 (a cell's ``<br>``) replace text by
    HTML placeholders *before* LINK (line 19) matches, so line 34's ``keep(url)`` takes the
    placeholders into the href and restore() (line 41) puts the HTML back inside the attribute.
    Not script (the escaped code cannot hold a quote), but model-controlled link targets
    silently differ from what was written, and renderer HTML lands in an attribute: the "URL is
    escaped" contract of the file's header does not hold.)"""
    seen = await _on_page(settings, _markup_in_url_session)
    assert all(link is not None for link in seen.values()), seen
    # The URL as written (the browser percent-encodes what a URL cannot hold), no renderer
    # markup in it.
    assert [link["href"] for link in seen.values()] == [
        "http://127.0.0.1:1/a%60b%60c", "http://127.0.0.1:1/a%3Cbr%3Ec"], seen


def _timing_session(sizes: dict[str, int], url: str, page: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, n in sizes.items():
        unit = {"brackets": "[", "bracket-a": "[a", "words": "word ", "links": "[a](http://b) ",
                "stars": "**a ", "ticks": "`a", "pipes": "|", "spaces-rule": "- "}[name]
        source = unit * (n // len(unit))
        out[name] = page.evaluate(
            "(s) => { const t = performance.now(); window.__md(s);"
            " return (performance.now() - t) / 1000; }",
            source)
    return out


async def test_no_linear_sized_input_hangs_the_renderer(settings: Settings) -> None:
    """Regex backtracking guard: 200,000 characters (a long report is 100,000; chat.js re-renders
    the whole answer once per frame while it streams) of the shapes the subset's regexes scan
    (emphasis runs, code-span backticks, pipes, rule-like runs, links, prose) each render in a
    blink; see the next test for the one that does not."""
    sizes = {k: 200_000 for k in ["words", "links", "stars", "ticks", "pipes", "spaces-rule"]}
    times = await _on_page(settings, partial(_timing_session, sizes))
    assert all(t < SLOW_RENDER_S / 5 for t in times.values()), times


async def test_a_long_run_of_open_brackets_does_not_hang_the_tab(settings: Settings) -> None:
    """Fixed (was: DEFECT: quadratic backtracking in LINK. Payload: ``"[" * 1_500_000`` (one
    line, no ``]``; ``"[a" * n`` is as bad, half the rate): one renderMarkdown takes ~35 s in
    this chromium (156; measured: 100,000 chars 0.22 s, 200,000 0.74 s, 400,000 2.4 s, 1,000,000
    15 s, 2,000,000 66 s -- n squared; node's older V8 is ~20x slower: 100,000 chars 4.5 s),
    where 200,000 characters of prose, emphasis, backticks or pipes take 0.002-0.1 s.
    service/web/markdown.js line 19: the LINK regex (``[``, then a label of anything but ``]``
    or a newline) is tried from every ``[``, and its label runs (and backtracks) to the end of
    the line each time: n squared / 2 steps; applied at line 33. While the answer streams,
    chat.js (AssistantView.later/render, lines 171-190) re-renders the whole answer every frame,
    so the cost is paid per frame: from ~300,000 characters every frame blocks the tab over a
    second, for the rest of the stream. The service puts no cap on an answer's length
    (max_tokens unset by default). Severity: moderate (quadratic, not exponential: it takes a
    very long answer, but a prompt-injected model can emit one).)"""
    times = await _on_page(settings, partial(_timing_session, {"brackets": 1_500_000}))
    assert times["brackets"] < SLOW_RENDER_S, times


# --- end to end: the payloads streamed by a model through the real page ----------------------

STREAMED = (
    "Sure. [a](http://127.0.0.1:1/\" onmouseover=\"pwn(1)) and [b](JaVaScRiPt:pwn(2)) "
    "<img src=x onerror=pwn(3)> `</code><svg onload=pwn(4)>` **<script>pwn(5)</script>**\n"
    "\n"
    "| h<br onclick=pwn(6)> | [c](http://127.0.0.1:1/\"><img src=x onerror=pwn(7)>) |\n"
    "|---|---|\n"
    "| <iframe src=javascript:pwn(8)> | x<br>y |\n"
    "\n"
    "# <details open ontoggle=pwn(9)>\n"
    "- [d](http://127.0.0.1:1/x)\" onmouseover=\"pwn(10)\n"
    "  - <a href=javascript:pwn(11)>e</a>\n"
    "```\n</code></pre><img src=x onerror=pwn(12)>\n```\n"
    "&lt;img src=x onerror=pwn(13)&gt; \\<img src=x onerror=pwn(14)\\> \u202etxt.exe\n"
)

_RECORD = r"""
() => {
  window.__seenBad = [];
  window.__renders = 0;
  const box = document.getElementById("messages");
  new MutationObserver((records) => {
    window.__renders++;
    for (const r of records) {
      for (const node of r.addedNodes) {
        if (node.nodeType !== 1 || !node.closest(".answer")) continue;
        window.__seenBad.push(...window.__badElement(node), ...window.__badTree(node));
      }
    }
  }).observe(box, { childList: true, subtree: true });
}
"""


_ANSWERS_BAD = "[...document.querySelectorAll('#messages .answer')].flatMap(window.__badTree)"


def _stream_session(url: str, page: Any) -> dict[str, Any]:
    page.evaluate(_RECORD)
    page.get_by_test_id("message-input").fill("go")
    page.get_by_test_id("send").click()
    answer = page.get_by_test_id("assistant-message").first
    expect(answer).to_contain_text("txt.exe")
    expect(page.get_by_test_id("stop")).to_be_hidden()
    links = answer.locator(".answer a")
    for i in range(links.count()):
        links.nth(i).hover()
        links.nth(i).click(modifiers=["Control"], no_wait_after=True)
    page.wait_for_timeout(500)
    live = {"bad": page.evaluate("window.__seenBad"), "renders": page.evaluate("window.__renders"),
            "final": page.evaluate(_ANSWERS_BAD),
            "text": answer.locator(".answer").inner_text(),
            "hrefs": links.evaluate_all("(as) => as.map((a) => a.href)")}
    # The stored answer, as a reload shows it (rendered whole, not streamed).
    page.reload()
    page.get_by_test_id("conversation").first.click()
    stored = page.get_by_test_id("assistant-message").first
    expect(stored).to_contain_text("txt.exe")
    assert page.evaluate(_SETUP)
    page.wait_for_timeout(300)
    live["stored_bad"] = page.evaluate(_ANSWERS_BAD)
    live["pwned"] = page.evaluate("window.__pwned")
    live["violations"] = page.evaluate("window.__violations")
    return live


async def test_a_streamed_hostile_answer_renders_no_markup_at_any_point(settings: Settings) -> None:
    """The payloads above, three characters a token with a pause between, through the real
    stream and the page's own per-frame render (with its real CSP): every element the page
    ever added to the answer — intermediate renders included, where a payload is cut in the
    middle of a URL or a tag — is one the renderer makes, with safe attributes; the finished
    and the reloaded (stored) answer too; no trap fires and no CSP violation is reported;
    bidi controls are shown as U+FFFD."""
    backend = ScriptedBackend(lambda req: _streamed_reply(req))
    seen = await _on_page(settings, _stream_session, bypass_csp=False, backend=backend)
    assert seen["bad"] == [], seen
    assert seen["final"] == [], seen
    assert seen["stored_bad"] == [], seen
    assert seen["pwned"] == [], seen
    assert seen["violations"] == [], seen
    assert seen["renders"] > 20, seen  # it was rendered progressively
    assert "\u202e" not in seen["text"]
    assert "\ufffdtxt.exe" in seen["text"]
    assert "<img src=x onerror=pwn(3)>" in seen["text"]
    assert seen["hrefs"], seen
    assert all(h.startswith("http://127.0.0.1:1/") for h in seen["hrefs"]), seen


def _streamed_reply(req: ChatRequest) -> Reply:
    return Reply(STREAMED, chunks=len(STREAMED) // 3, gap=0.01)
