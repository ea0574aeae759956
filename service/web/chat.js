// The chat page: conversations, a run's events streamed from fetch() (so the key travels in the
// Authorization header), the answer as Markdown, the agent's steps folded, Stop (cancels the run
// on the server), and a reload mid-run that re-joins with Last-Event-ID. No build step.
import { clean, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const LIVE = "service.live"; // the run being followed: survives a reload (sessionStorage)
const KEY = "service.key";
// ``run``: the tab's own run ("starting" until its id is known); ``own``: its reply's view, which
// stays the run's while another conversation is on screen (put back when its own is opened).
const state = { conversation: null, run: null, own: null, key: localStorage.getItem(KEY) || "", stopped: null };
// The tab's run has no reply on screen yet (its message being sent, its re-join after a reload
// opening its conversation): a click on another conversation now would run over it.
const settling = () => state.run === "starting" || state.rejoining;

function headers(extra = {}) {
  return state.key ? { ...extra, Authorization: `Bearer ${state.key}` } : extra;
}

async function failure(resp) {
  if (resp.status === 401) $("key-form").hidden = false;
  let err;
  try {
    const { error } = await resp.json();
    err = new Error(resp.status === 401 ? `${error.message}: enter a key above` : error.message);
  } catch {
    err = new Error(`the service answered ${resp.status} ${resp.statusText}`);
  }
  err.status = resp.status;
  return err;
}

// A key goes in a header: printable ASCII only (fetch refuses anything else before sending,
// which read as "cannot reach the service"; a pasted typographic quote is the usual case).
const sendableKey = (key) => /^[\x21-\x7e]*$/.test(key);

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let resp;
  try {
    resp = await fetch(path, init);
  } catch {
    throw new Error(sendableKey(state.key) ? "cannot reach the service"
      : "the key holds characters a header cannot carry: enter it again above");
  }
  if (!resp.ok) throw await failure(resp);
  return resp.status === 204 ? null : resp.json();
}

function problem(text) {
  $("problem").textContent = clean(text || ""); // (an error's text may quote a model's)
  $("problem").hidden = !text;
}

// A stream that goes silent (a proxy froze it: no token, no keep-alive, no close) is given up
// after four of its keep-alive intervals (X-Keepalive-Interval): the caller re-joins.
const SILENT_INTERVALS = 4;

async function* sseFrames(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  const every = Number(resp.headers.get("X-Keepalive-Interval")) || 15;
  let buffer = "";
  try {
    for (;;) {
      let timer;
      const silent = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("the stream went silent")), SILENT_INTERVALS * every * 1000);
      });
      let read;
      try { read = await Promise.race([reader.read(), silent]); } finally { clearTimeout(timer); }
      if (read.done) return;
      yield* frames(read.value);
    }
  } finally {
    reader.cancel().catch(() => {}); // the connection closed, not left open behind a silent peer
  }

  function* frames(value) {
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const frame = { data: [] };
      let comment = false;
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) comment = true; // a keep-alive: the service is there
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") frame.data.push(text); else frame[name] = text;
      }
      if (frame.data.length) yield { id: frame.id, event: frame.event, data: JSON.parse(frame.data.join("\n")) };
      else if (comment) yield { keepalive: true };
    }
  }
}

function describe(kind, data) {
  // A plan step's own work (a wave's steps run at once): which step it was for.
  const line = what(kind, data);
  return data.step == null ? line : `[step ${data.step}] ${line}`;
}

function what(kind, data) {
  switch (kind) {
    case "thought": return `thinking: ${data.text ?? ""}`;
    case "tool.call": return `tool ${data.name}(${JSON.stringify(data.arguments ?? {})})`;
    case "tool.result": return "error" in data ? `tool error: ${data.error}` : `tool result: ${typeof data.output === "string" ? data.output : JSON.stringify(data.output)}`;
    case "plan": return `plan: ${(data.steps ?? []).map((s) => s.task ?? JSON.stringify(s)).join("; ")}`;
    case "step.started": return `step ${data.id}: ${data.task ?? ""}`;
    case "decision": return `agent: ${data.agent} (chosen by ${data.method})`;
    default: return "error" in data ? `step ${data.id} failed: ${data.error}` : `step ${data.id} done`;
  }
}

// The message pane follows new text while its reader is at the bottom; scrolled up to read,
// it stays there until they scroll back down (or send).
const scroll = { stick: true, placed: 0 };
$("messages").addEventListener("scroll", () => {
  const pane = $("messages");
  if (pane.scrollHeight - pane.scrollTop - pane.clientHeight < 48) scroll.stick = true;
  else if (pane.scrollTop < scroll.placed - 4) scroll.stick = false; // the reader, not the page
});

function keepInView() {
  if (!scroll.stick) return;
  const pane = $("messages");
  pane.scrollTop = pane.scrollHeight;
  scroll.placed = pane.scrollTop;
}

function toBottom() {
  scroll.stick = true;
  keepInView();
}

const STEPS_KEPT = 100; // step lines kept for a reload (each up to 2,000 characters)

class AssistantView {
  // ``steps``: lines shown before (a reload re-joins from where it was: they do not come again).
  // ``box``: where an older page's reply is put (not followed to the bottom of the pane).
  constructor(text = "", steps = [], box = null) {
    this.lines = []; // the step lines, as kept for a reload (sessionStorage)
    this.el = document.createElement("div");
    this.el.className = "message assistant";
    this.el.dataset.testid = "assistant-message";
    this.steps = document.createElement("details");
    this.steps.className = "steps";
    this.steps.dataset.testid = "steps";
    this.steps.hidden = true;
    this.steps.innerHTML = "<summary>steps</summary><ol></ol>";
    this.answer = document.createElement("div");
    this.answer.className = "answer";
    this.el.append(this.steps, this.answer);
    if (box) box.append(this.el);
    else {
      $("messages").append(this.el);
      toBottom(); // a new reply: shown, and followed
    }
    for (const line of steps) this.addStep(line);
    this.segment = text;
    this.render();
  }

  // Tokens are shown at most once per frame: a render parses the whole answer so far, and
  // once per token a long answer cost its length per token (the page fell tens of seconds
  // behind a 100,000-character report). Anything else renders at once (``render``).
  later() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = 0; this.render(); });
  }

  render() {
    if (this.frame) { cancelAnimationFrame(this.frame); this.frame = 0; }
    // Only the blocks that changed are replaced (the last, as tokens come): the text already
    // shown stays the same nodes, so a selection in it survives, and a long answer is not
    // laid out again whole per token.
    const fresh = document.createElement("template");
    fresh.innerHTML = renderMarkdown(this.segment);
    const now = [...fresh.content.children];
    const shown = [...this.answer.children];
    now.forEach((block, i) => {
      if (i >= shown.length) this.answer.append(block);
      else if (!shown[i].isEqualNode(block)) shown[i].replaceWith(block);
    });
    for (const gone of shown.slice(now.length)) gone.remove();
    keepInView();
  }

  token(text) { this.waiting(null); this.thinking = false; this.segment += text; this.later(); }

  // A wait for a backend slot (``queued``): said until the model starts (null: over).
  waiting(position) {
    if (position == null) { this.queueNote?.remove(); this.queueNote = null; return; }
    const first = !this.queueNote;
    if (first) {
      this.queueNote = document.createElement("p");
      this.queueNote.className = "note quiet";
      this.queueNote.dataset.testid = "run-waiting";
      this.el.append(this.queueNote);
    }
    this.queueNote.textContent = position > 1
      ? `waiting for the model: ${position - 1} ahead in its queue` : "waiting for the model: next in its queue";
    if (first) announce(this.queueNote.textContent); // once: not at every place gained
    keepInView();
  }

  step(kind, data) {
    this.waiting(null);
    // The text so far was a step's (a ReAct thought), not the answer; a reasoning model's
    // thinking is not a step (it may come between answer tokens): the answer goes on, and
    // its thinking, a piece per token, is one running line.
    if (kind === "thought" && data.reasoning) {
      if (this.thinking) this.extendStep(data.text ?? "");
      else this.addStep(describe(kind, data));
      this.thinking = true;
      return;
    }
    this.thinking = false;
    if (this.segment.trim()) this.addStep(this.segment.trim());
    this.segment = "";
    this.addStep(describe(kind, data));
    this.render();
  }

  extendStep(text) {
    const li = this.steps.querySelector("ol").lastElementChild;
    li.textContent += clean(text);
    this.lines[this.lines.length - 1] = li.textContent.slice(0, 2000);
    keepInView();
  }

  addStep(text) {
    this.lines.push(text.slice(0, 2000));
    if (this.lines.length > STEPS_KEPT) this.lines.shift();
    const li = document.createElement("li");
    li.dir = "auto";
    li.textContent = clean(text);
    this.steps.querySelector("ol").append(li);
    this.steps.hidden = false;
    this.steps.querySelector("summary").textContent = `steps (${this.steps.querySelectorAll("li").length})`;
  }

  note(text, quiet = false) {
    // Said once: each re-join refused the same way (the store away for a while) would add it again.
    const last = this.el.lastElementChild;
    if (last?.classList.contains("note") && last.textContent === text) return;
    const p = document.createElement("p");
    p.className = quiet ? "note quiet" : "note";
    p.dataset.testid = quiet ? "run-note" : "run-error";
    p.textContent = clean(text);
    this.el.append(p);
    keepInView();
  }

  // ``mine``: this page asked for the cancel (the user's own Stop).
  ended(status, error, reason, content, mine = false) {
    this.waiting(null);
    // A reply cut short, as the store keeps it (a ReAct turn's answer part, not its thought).
    if (status !== "succeeded" && typeof content === "string") { this.segment = content; this.render(); }
    let said = "";
    if (status === "cancelled") {
      const [text, quiet] = stopped(reason, mine);
      this.note(text, quiet);
      said = text;
    } else if (status !== "succeeded") {
      said = error ? `${status}: ${error.message}` : reason ? `${status}: ${reason}` : `the run ${status}`;
      this.note(said);
    }
    // Said once, whole: the reply was marked busy while it streamed (see followRun). Its
    // text as laid out (innerText: blocks, items and cells apart, not run together).
    const answer = this.answer.innerText.trim();
    announce(said ? (answer ? `${said}. The answer so far: ${answer}` : said) : answer || "empty answer");
  }
}

const ANNOUNCED_MAX = 1000; // characters of a reply read out by the announcer (all of it is on screen)

// What a screen reader says (the announcer, a status region): a reply once it is whole, or
// why it ended, instead of every token of it as it streams.
function announce(text) {
  const chars = Array.from(clean(text));
  $("announce").textContent = chars.length > ANNOUNCED_MAX
    ? `${chars.slice(0, ANNOUNCED_MAX).join("")}… (the rest is on screen)` : chars.join("");
}

// How a cancelled run is shown: the user's own Stop quietly; anything else (the service
// shutting down, another client) says so, since asking again is then worth it. ``mine``: this
// page sent the cancel (false: it cannot tell, as for a stored reply, or another client did).
function stopped(reason, mine = null) {
  if (mine === false && reason === "cancelled by request") {
    return ["stopped elsewhere (another client cancelled it); ask again for the whole answer", false];
  }
  if (!reason || reason === "cancelled by request") return ["stopped", true];
  if (reason === "shutdown") return ["stopped: the service shut down before the answer was done; ask again", false];
  return [`stopped: ${reason}`, false];
}

function addUser(text, box = null) {
  const div = document.createElement("div");
  div.className = "message user";
  div.dataset.testid = "user-message";
  div.dir = "auto";
  div.textContent = clean(text); // as stored: another client's may hold bidi controls
  if (box) box.append(div);
  else {
    $("messages").append(div);
    toBottom();
  }
}

function running(runId) {
  state.run = runId;
  if (!runId) state.stopPending = false;
  // Stop hidden with the focus on it (a keyboard user's Enter), or Send disabled with it,
  // would leave the focus nowhere: it goes to the control that takes over.
  const focused = document.activeElement;
  $("stop").hidden = !runId;
  $("send").disabled = Boolean(runId);
  // (Another conversation may be on screen meanwhile: Send is this tab's one run's.)
  $("send").title = runId ? "an answer is being written: Send is free again once it ends (or Stop it)" : "";
  if (focused === $("stop") && !runId) $("input").focus();
  if (focused === $("send") && runId) $("stop").focus();
}

const STEPS = new Set(["thought", "tool.call", "tool.result", "plan", "step.started", "step.finished", "decision"]);
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// The tab's own run as kept for a reload (sessionStorage): its id, where it is, its text so far.
const KEEP_EVERY = 500;
const kept = { live: null, at: 0 };

function keep(live) {
  const fresh = kept.live !== live; // a run's first: written at once
  kept.live = live;
  if (!fresh && performance.now() - kept.at < KEEP_EVERY) return;
  kept.at = performance.now();
  sessionStorage.setItem(LIVE, JSON.stringify(live));
}

function dropKept() {
  kept.live = null;
  sessionStorage.removeItem(LIVE);
}

// A reload (or a tab closed) keeps where the run was at that moment.
addEventListener("pagehide", () => {
  if (kept.live) sessionStorage.setItem(LIVE, JSON.stringify(kept.live));
});

// One stream of the run's events; true once run.finished came.
async function follow(resp, view, live) {
  let error = null;
  for await (const { id, event, data, keepalive } of sseFrames(resp)) {
    // Shown already: a proxy that dropped the re-join's Last-Event-ID replays the run.
    if (id && Number(id) <= live.last_id) continue;
    // The run goes on, and we hear of it: a keep-alive, or an event past the last one.
    if (keepalive || (id && Number(id) !== live.last_id)) live.heard = Date.now();
    if (keepalive) continue;
    if (event === "run.started") {
      live.run_id = data.run_id;
      if (!live.watch) {
        running(data.run_id);
        if (state.stopPending) stop();
      }
    } else if (event === "token") view.token(data.text ?? "");
    else if (event === "message") { view.segment = data.content ?? ""; view.render(); }
    else if (event === "error" && !id) { // not the run's: the stream's
      view.note(`${data.type}: ${data.message}`);
      announce(`${data.type}: ${data.message}`);
    }
    else if (event === "error") error = data;
    else if (event === "queued") view.waiting(data.position);
    else if (event === "run.finished") {
      if (!live.watch) dropKept();
      view.ended(data.status, error, data.error, data.content, live.watch ? null : state.stopped === live.run_id);
      return true;
    } else if (STEPS.has(event)) view.step(event, data);
    if (id) {
      // Where a re-join resumes (a watched run's too: from 0 it replayed the whole run onto
      // the text shown); only this tab's own run is kept for a reload, at most every
      // KEEP_EVERY ms (the whole text each time) and when the page goes away.
      live.last_id = Number(id);
      live.text = view.segment;
      live.steps = view.lines;
      // A Stop clicked before the run was known (or before this stream's first event) is
      // kept with it too.
      if (state.stopped === live.run_id) live.stopped = true;
      if (!live.watch) keep(live);
    }
  }
  return false;
}

// Follow the run to its end; its reply is busy meanwhile (aria-busy: a screen reader waits
// for it whole rather than reading every token; its end is announced).
async function followRun(resp, view, live) {
  view.el.setAttribute("aria-busy", "true");
  try {
    await followEvents(resp, view, live);
  } finally {
    view.el.setAttribute("aria-busy", "false");
  }
}

// Re-joins go on for REJOIN_FOR ms without a word from the service (an event or a keep-alive:
// a restart of the service or of a proxy in front of it takes seconds), each after up to
// REJOIN_PAUSE_MAX ms or the Retry-After it gave (a re-join is always tried after that); a
// re-join that brings a word starts the count again (a long or quiet run behind a proxy that
// cuts every stream after a while is followed to its end, however many times it is cut).
const REJOIN_FOR = 30000;
const REJOIN_PAUSE_MAX = 5000;
const REJOIN_ANSWER_WITHIN = 15000;

// The run's events to its end, re-joining (Last-Event-ID) when the stream drops.
async function followEvents(resp, view, live) {
  let refused = null; // the last re-join's refusal worth a retry (5xx, 429), said if it is the last
  let wait = 0;
  let since = Date.now(); // the last word from the service, or the first try
  for (let attempt = 0; ; attempt++) {
    const heard = live.heard;
    try {
      if (await follow(resp, view, live)) return;
    } catch { /* the connection dropped */ }
    if (live.signal?.aborted) return; // its conversation is no longer on screen
    if (live.heard !== heard) { attempt = 0; since = live.heard; } // it spoke: a new count
    const pause = Math.max(Math.min(500 * 2 ** attempt, REJOIN_PAUSE_MAX), wait);
    if (!live.run_id || Date.now() - since > REJOIN_FOR) {
      const why = refused ? ` (${refused.message})` : "";
      const said = `the stream ended before the run did${why}; reload to re-join`;
      view.note(said);
      announce(said);
      return;
    }
    await sleep(pause);
    // A re-join whose answer never starts (a proxy that takes the connection and says
    // nothing) is a failed try after REJOIN_ANSWER_WITHIN ms, not a wait for ever; once the
    // stream has started, the page's silence watchdog (sseFrames) looks after it.
    const asked = new AbortController();
    const late = setTimeout(() => asked.abort(), REJOIN_ANSWER_WITHIN);
    // The conversation leaving the screen ends the stream too (no listener left behind).
    const signal = live.signal ? AbortSignal.any([live.signal, asked.signal]) : asked.signal;
    try {
      resp = await fetch(`/api/runs/${live.run_id}/events`, {
        headers: headers({ "Last-Event-ID": String(live.last_id) }), signal,
      });
    } catch { resp = null; } finally { clearTimeout(late); }
    refused = null;
    wait = 0;
    if (resp && resp.status === 204) { if (!live.watch) dropKept(); return; }
    // 5xx and 429 are worth a retry (the store slow for a moment, a proxy restarting): a failed
    // attempt, tried again (after Retry-After, up to 30 s, if it says); any other refusal (the
    // run gone, not this key's) ends here.
    if (resp && !resp.ok && resp.status < 500 && resp.status !== 429) throw await failure(resp);
    if (resp && !resp.ok) {
      wait = Math.min(30, Number(resp.headers.get("Retry-After")) || 0) * 1000;
      refused = await failure(resp);
    }
    if (!resp || !resp.ok) resp = new Response("");
  }
}

function picks() {
  const out = {};
  if ($("agent").value) out.agent = $("agent").value;
  if ($("model").value) out.model = $("model").value;
  return out;
}

async function send() {
  const content = $("input").value.trim();
  if (!content) return;
  if (state.run) { // (Enter: the disabled Send's title is not seen)
    problem("an answer is still being written: send this once it ends, or Stop it");
    return;
  }
  problem("");
  opening++; // a conversation still being opened is not shown over this one
  running("starting");
  try {
    if (!state.conversation) {
      // Whole characters (code points): a slice of UTF-16 units can cut an emoji in half, a
      // lone surrogate the service refuses (the message was not sent at all).
      const title = Array.from(content).slice(0, 60).join("");
      const conv = await api("POST", "/api/conversations", { title, ...picks() });
      state.conversation = conv.id;
      await loadConversations();
    }
    // One key per message: sent again after its request failed (the connection lost, maybe
    // after the service had it), the same key gets the run the first began, not a second
    // copy of the question and a second answer.
    // (The same message: its text, conversation, agent and model; another is a new one.)
    const asked = JSON.stringify([content, state.conversation, picks()]);
    if (state.unsent?.asked !== asked) {
      const bytes = crypto.getRandomValues(new Uint8Array(16)); // (randomUUID: HTTPS only)
      state.unsent = { asked,
        key: Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("") };
    }
    let resp;
    try {
      resp = await fetch(`/api/conversations/${state.conversation}/messages`, {
        method: "POST",
        headers: headers({ "Content-Type": "application/json",
          "Idempotency-Key": state.unsent.key }),
        // "continue": a reload does not cancel the run; the page re-joins it.
        body: JSON.stringify({ content, stream: true, on_disconnect: "continue", ...picks() }),
      });
    } catch {
      // Said as any other request's (the browser's own words were "Failed to fetch"); the
      // message stays typed. (It may have arrived before the connection failed: sent again,
      // its key gets that run.)
      throw new Error(sendableKey(state.key) ? "cannot reach the service"
        : "the key holds characters a header cannot carry: enter it again above");
    }
    if (resp.status === 404) {
      // The conversation was deleted elsewhere (another tab, a client): let go of it, or every
      // message would be refused the same way. The message stays typed, for a new one.
      forget(state.conversation);
      state.conversation = null;
      $("messages").replaceChildren();
      await loadConversations().catch(() => {});
      throw new Error("this conversation was deleted elsewhere; send again to start a new one");
    }
    if (!resp.ok) {
      if (resp.status !== 429 && resp.status < 500) state.unsent = null; // (refused: not sent)
      throw await failure(resp);
    }
    state.unsent = null; // (a message typed alike later is a new one)
    $("input").value = "";
    addUser(content);
    const conversation = state.conversation; // (another may be on screen by its end)
    state.own = new AssistantView();
    // Its run, known with the headers (X-Run-Id): Stop works at once, and a stream cut before
    // its first event (a proxy restarting) is re-joined, now or after a reload.
    const live = { conversation_id: conversation, last_id: 0, text: "" };
    const runId = resp.headers.get("X-Run-Id");
    if (runId) {
      live.run_id = runId;
      running(runId);
      keep(live);
      if (state.stopPending) { state.stopPending = false; stop(); }
    }
    await followRun(resp, state.own, live);
    used(conversation); // first in the list now
    await loadConversations();
  } catch (exc) {
    problem(exc.message);
  } finally {
    running(null);
    state.own = null;
  }
}

async function stop() {
  if (!state.run) return;
  if (state.run === "starting") { state.stopPending = true; return; } // sent once the run is known
  state.stopped = state.run; // this page's own Stop: its end is said quietly
  if (kept.live?.run_id === state.run) {
    // ... after a reload too (its end may come after it).
    kept.live.stopped = true;
    sessionStorage.setItem(LIVE, JSON.stringify(kept.live));
  }
  try {
    await api("POST", `/api/runs/${state.run}/cancel`);
  } catch (exc) {
    problem(exc.message);
  }
}

// The conversations listed: the service's pages (newest first by creation), shown last used
// first; "Older conversations" loads the next page. Once older pages are loaded, the first
// page is merged in again (a reload of it alone dropped them, and a conversation continued
// from them).
const listed = { convs: [], next: null, deeper: false };

async function loadConversations(more = false) {
  const page = await api("GET", `/api/conversations?limit=100${more && listed.next ? `&before=${encodeURIComponent(listed.next)}` : ""}`);
  const byId = new Map(more || listed.deeper ? listed.convs.map((c) => [c.id, c]) : []);
  for (const conv of page.data) byId.set(conv.id, conv);
  listed.convs = [...byId.values()];
  if (more || !listed.deeper) listed.next = page.next;
  listed.deeper ||= more;
  showConversations();
}

// The conversation just used is listed first (the service's pages are by creation).
function used(id) {
  const conv = listed.convs.find((c) => c.id === id);
  if (!conv) return;
  const latest = Math.max(Date.now(), ...listed.convs.map((c) => Date.parse(c.updated_at) || 0));
  conv.updated_at = new Date(latest + 1).toISOString();
}

function forget(id) {
  listed.convs = listed.convs.filter((c) => c.id !== id);
}

function showConversations() {
  const list = $("conversations");
  // The button with the focus (a keyboard user's Enter on it) is made again: the focus goes
  // to the new one, not to the page's body.
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  const refocus = focused && (focused.dataset.id || focused.dataset.testid);
  list.replaceChildren();
  const used = (c) => Date.parse(c.updated_at) || 0;
  // Sorted stably: equal times keep the service's order.
  for (const conv of [...listed.convs].sort((a, b) => used(b) - used(a))) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.testid = "conversation";
    button.dataset.id = conv.id;
    button.dir = "auto";
    button.textContent = clean(conv.title || "untitled");
    const current = conv.id === state.conversation;
    button.classList.toggle("current", current);
    if (current) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => openConversation(conv.id).catch((exc) => problem(exc.message)));
    li.append(button);
    list.append(li);
  }
  if (listed.next) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "older";
    button.dataset.testid = "older-conversations";
    button.textContent = "Older conversations";
    button.addEventListener("click", () => loadConversations(true).catch((exc) => problem(exc.message)));
    li.append(button);
    list.append(li);
  }
  if (refocus) {
    const again = [...list.querySelectorAll("button")].find(
      (b) => b.dataset.id === refocus || (!b.dataset.id && b.dataset.testid === refocus));
    (again ?? list.querySelector("button") ?? $("input")).focus();
  }
}

const WATCH_MAX = 3; // replies going elsewhere followed at once (see openConversation)
// Messages shown when a conversation opens, the newest; older ones a page at a time on demand
// (a conversation kept for months was fetched and drawn whole at every open).
const PAGE = 100;

function storedReply(m, box = null) {
  const view = new AssistantView(m.content, [], box);
  if (m.status === "cancelled") view.note(...stopped(m.error));
  else if (m.status === "error") view.note(m.error ? `failed: ${m.error}` : "failed");
  return view;
}

function olderButton(id, cursor) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "older";
  button.dataset.testid = "older-messages";
  button.textContent = "Earlier messages";
  button.addEventListener("click", () => loadOlder(id, cursor, button).catch((exc) => problem(exc.message)));
  return button;
}

// The page before ``cursor``, put above what is shown, the pane kept on what it showed.
async function loadOlder(id, cursor, button) {
  button.disabled = true;
  let conv;
  try {
    conv = await api("GET", `/api/conversations/${id}?limit=${PAGE}&before=${encodeURIComponent(cursor)}`);
  } finally {
    button.disabled = false;
  }
  if (state.conversation !== id || !button.isConnected) return; // another opened meanwhile
  const older = document.createDocumentFragment();
  if (conv.messages_next) older.append(olderButton(id, conv.messages_next));
  for (const m of conv.messages) {
    if (m.role === "user") addUser(m.content, older);
    else if (m.role === "assistant") {
      const view = storedReply(m, older);
      // (Its run still going: only the newest page's replies are followed.)
      if (m.status === "pending") view.note("still going: its answer is stored when it ends", true);
    }
  }
  const pane = $("messages");
  const below = pane.scrollHeight - pane.scrollTop;
  button.replaceWith(older);
  pane.scrollTop = pane.scrollHeight - below;
  scroll.placed = pane.scrollTop;
}
let viewing = null; // the follows of the conversation on screen (aborted when another opens)
let opening = 0; // the latest conversation asked for (an earlier answer coming late is dropped)

// ``own``: the tab's own re-join opens its run's conversation. A click while the tab's message is
// being sent is ignored (its reply goes on the screen it was sent from); once its answer streams,
// another conversation opens, the run goes on (on_disconnect: continue) and its reply is put back
// when its conversation is opened again.
async function openConversation(id, skipRun = null, own = false) {
  if (settling() && !own) return;
  const asked = ++opening;
  let conv;
  try {
    conv = await api("GET", `/api/conversations/${id}?limit=${PAGE}`);
  } catch (exc) {
    // The conversation on screen stays as it was, its replies still followed. One deleted
    // elsewhere is no longer listed (every click on it would fail the same way).
    if (exc.status === 404) { forget(id); showConversations(); }
    throw exc;
  }
  // Another conversation was opened meanwhile, or a message sent (a new conversation
  // started): this answer comes too late to replace the one on screen.
  if (asked !== opening || (settling() && !own)) return;
  if (!own) problem(""); // an earlier click's failure is over (a re-join's leaves the list's)
  viewing?.abort();
  const mine = (viewing = new AbortController());
  state.conversation = id;
  $("messages").replaceChildren();
  if (conv.messages_next) $("messages").append(olderButton(id, conv.messages_next));
  const pending = []; // replies whose run is still going (another tab's, or before a reopen)
  for (const m of conv.messages) {
    if (m.role === "user") addUser(m.content);
    else if (m.role === "assistant" && state.own && m.run_id === state.run && !own) {
      $("messages").append(state.own.el); // the tab's own run, still followed: as it is now
      toBottom();
    } else if (m.role === "assistant" && !(skipRun && m.run_id === skipRun)) {
      const view = storedReply(m);
      if (m.status === "pending" && m.run_id) pending.push({ view, run_id: m.run_id });
    }
  }
  showConversations(); // marks it current
  // The newest few only: a browser holds 6 HTTP/1.1 connections to a host and each followed
  // reply takes one; following them all could leave this tab's own message and Stop queued.
  pending.forEach((p, i) => {
    if (i < pending.length - WATCH_MAX) p.view.note("still going elsewhere: open the conversation again later for its answer", true);
    else watch(p, mine.signal).catch(() => { /* left as stored */ });
  });
}

// Show a run found going when its conversation was opened (the stored reply is empty until
// the run ends): its events from the first, until it ends or another conversation is opened.
// Watched only: the page stays free (another conversation, a new message), Stop is the
// starter's, and the tab's own re-join entry is untouched.
async function watch({ view, run_id }, signal) {
  const live = { run_id, last_id: 0, text: "", watch: true, signal };
  const resp = await fetch(`/api/runs/${run_id}/events`, { headers: headers(), signal });
  if (resp.ok && resp.status !== 204) await followRun(resp, view, live);
}

async function rejoin() {
  const live = JSON.parse(sessionStorage.getItem(LIVE) || "null");
  // (start() again, a key entered: a run this page follows already is not joined twice)
  if (!live || !live.run_id || state.run) return;
  try {
    await rejoinRun(live);
  } catch (exc) {
    // Gone (its conversation deleted) or not this key's: told once, then forgotten.
    if (exc.status >= 400 && exc.status < 500) dropKept();
    throw exc;
  }
}

async function rejoinRun(live) {
  running(live.run_id);
  state.rejoining = true; // until its reply is on screen: a click now would run over it
  if (live.stopped) state.stopped = live.run_id; // this page's Stop, before the reload
  try {
    await openConversation(live.conversation_id, live.run_id, true);
    const resp = await fetch(`/api/runs/${live.run_id}/events`, {
      headers: headers({ "Last-Event-ID": String(live.last_id) }),
    });
    if (resp.status === 204) { // it ended while the page was away, and was seen to the end
      dropKept();
      state.rejoining = false;
      running(null);
      await openConversation(live.conversation_id);
      return;
    }
    if (!resp.ok) throw await failure(resp);
    state.own = new AssistantView(live.text || "", live.steps || []);
    state.rejoining = false;
    await followRun(resp, state.own, live);
  } finally {
    state.rejoining = false;
    running(null);
    state.own = null;
  }
}

async function loadModels() {
  try {
    const { data } = await api("GET", "/v1/models");
    // Listed again (a key entered again runs start() again): once each, the choice kept.
    const picker = $("model");
    const chosen = picker.value;
    picker.replaceChildren(picker.options[0]);
    for (const model of data) picker.append(new Option(clean(model.id), model.id));
    if ([...picker.options].some((o) => o.value === chosen)) picker.value = chosen;
  } catch { /* no backend reachable yet: the default model */ }
}

async function start() {
  problem("");
  try {
    await loadConversations();
    $("key-form").hidden = true;
  } catch (exc) {
    problem(exc.message);
    if (exc.status === 401) return; // nothing works without a key: asked for above
  }
  // A refused list (the store away for a moment) does not cost the run being followed.
  await loadModels();
  try {
    await rejoin();
  } catch (exc) {
    problem(exc.message);
  }
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  // An Enter that commits an input method's candidate (Japanese, Chinese, Korean) only does that.
  if (e.isComposing || e.keyCode === 229) return;
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", stop);
$("new").addEventListener("click", () => {
  if (settling()) return; // (as openConversation's)
  opening++; // (as send's)
  viewing?.abort(); // the replies followed there are off screen now
  viewing = null;
  state.conversation = null;
  $("messages").replaceChildren();
  showConversations();
  $("input").focus();
});
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  if (!sendableKey($("key").value.trim())) {
    problem("a key is printable ASCII only (no spaces, no typographic quotes): enter it again");
    return;
  }
  state.key = $("key").value.trim();
  localStorage.setItem(KEY, state.key);
  start();
});
start();
