// The chat page: conversations, a run's events streamed from fetch() (so the key travels in the
// Authorization header), the answer as Markdown, the agent's steps folded, Stop (cancels the run
// on the server), and a reload mid-run that re-joins with Last-Event-ID. No build step.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const LIVE = "service.live"; // the run being followed: survives a reload (sessionStorage)
const KEY = "service.key";
const state = { conversation: null, run: null, key: localStorage.getItem(KEY) || "" };

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
  $("problem").textContent = text || "";
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
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // keep-alive comments
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") frame.data.push(text); else frame[name] = text;
      }
      if (frame.data.length) yield { id: frame.id, event: frame.event, data: JSON.parse(frame.data.join("\n")) };
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
    default: return `step ${data.id} done`;
  }
}

const STEPS_KEPT = 100; // step lines kept for a reload (each up to 2,000 characters)

class AssistantView {
  // ``steps``: lines shown before (a reload re-joins from where it was: they do not come again).
  constructor(text = "", steps = []) {
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
    $("messages").append(this.el);
    for (const line of steps) this.addStep(line);
    this.segment = text;
    this.render();
  }

  render() {
    this.answer.innerHTML = renderMarkdown(this.segment);
    this.el.scrollIntoView({ block: "end" });
  }

  token(text) { this.segment += text; this.render(); }

  step(kind, data) {
    // The text so far was a step's (a ReAct thought), not the answer; a reasoning model's
    // thinking is not a step (it may come between answer tokens): the answer goes on.
    if (!(kind === "thought" && data.reasoning)) {
      if (this.segment.trim()) this.addStep(this.segment.trim());
      this.segment = "";
    }
    this.addStep(describe(kind, data));
    this.render();
  }

  addStep(text) {
    this.lines.push(text.slice(0, 2000));
    if (this.lines.length > STEPS_KEPT) this.lines.shift();
    const li = document.createElement("li");
    li.textContent = text;
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
    p.textContent = text;
    this.el.append(p);
  }

  ended(status, error, reason, content) {
    // A reply cut short, as the store keeps it (a ReAct turn's answer part, not its thought).
    if (status !== "succeeded" && typeof content === "string") { this.segment = content; this.render(); }
    if (status === "cancelled") this.note(...stopped(reason));
    else if (status !== "succeeded") {
      this.note(error ? `${status}: ${error.message}` : reason ? `${status}: ${reason}` : `the run ${status}`);
    }
  }
}

// How a cancelled run is shown: the user's own Stop quietly; anything else (the service
// shutting down, another client) says so, since asking again is then worth it.
function stopped(reason) {
  if (!reason || reason === "cancelled by request") return ["stopped", true];
  if (reason === "shutdown") return ["stopped: the service shut down before the answer was done; ask again", false];
  return [`stopped: ${reason}`, false];
}

function addUser(text) {
  const div = document.createElement("div");
  div.className = "message user";
  div.dataset.testid = "user-message";
  div.textContent = text;
  $("messages").append(div);
}

function running(runId) {
  state.run = runId;
  if (!runId) state.stopPending = false;
  $("stop").hidden = !runId;
  $("send").disabled = Boolean(runId);
}

const STEPS = new Set(["thought", "tool.call", "tool.result", "plan", "step.started", "step.finished"]);
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

// One stream of the run's events; true once run.finished came.
async function follow(resp, view, live) {
  let error = null;
  for await (const { id, event, data } of sseFrames(resp)) {
    if (event === "run.started") {
      live.run_id = data.run_id;
      if (!live.watch) {
        running(data.run_id);
        if (state.stopPending) stop();
      }
    } else if (event === "token") view.token(data.text ?? "");
    else if (event === "message") { view.segment = data.content ?? ""; view.render(); }
    else if (event === "error" && !id) view.note(`${data.type}: ${data.message}`); // not the run's: the stream's
    else if (event === "error") error = data;
    else if (event === "run.finished") {
      if (!live.watch) sessionStorage.removeItem(LIVE);
      view.ended(data.status, error, data.error, data.content);
      return true;
    } else if (STEPS.has(event)) view.step(event, data);
    if (id) {
      // Where a re-join resumes (a watched run's too: from 0 it replayed the whole run onto
      // the text shown); only this tab's own run is kept for a reload.
      live.last_id = Number(id);
      live.text = view.segment;
      live.steps = view.lines;
      if (!live.watch) sessionStorage.setItem(LIVE, JSON.stringify(live));
    }
  }
  return false;
}

// Follow the run to its end, re-joining (Last-Event-ID) when the stream drops.
async function followRun(resp, view, live) {
  let refused = null; // the last re-join's refusal worth a retry (5xx, 429), said if it is the last
  let wait = 0;
  for (let attempt = 0; ; attempt++) {
    try {
      if (await follow(resp, view, live)) return;
    } catch { /* the connection dropped */ }
    if (live.signal?.aborted) return; // its conversation is no longer on screen
    if (!live.run_id || attempt >= 4) {
      const why = refused ? ` (${refused.message})` : "";
      view.note(`the stream ended before the run did${why}; reload to re-join`);
      return;
    }
    await sleep(Math.max(500 * 2 ** attempt, wait));
    try {
      resp = await fetch(`/api/runs/${live.run_id}/events`, {
        headers: headers({ "Last-Event-ID": String(live.last_id) }), signal: live.signal,
      });
    } catch { resp = null; }
    refused = null;
    wait = 0;
    if (resp && resp.status === 204) { if (!live.watch) sessionStorage.removeItem(LIVE); return; }
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
  if (!content || state.run) return;
  problem("");
  running("starting");
  try {
    if (!state.conversation) {
      const conv = await api("POST", "/api/conversations", { title: content.slice(0, 60), ...picks() });
      state.conversation = conv.id;
      await loadConversations();
    }
    const resp = await fetch(`/api/conversations/${state.conversation}/messages`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      // "continue": a reload does not cancel the run; the page re-joins it.
      body: JSON.stringify({ content, stream: true, on_disconnect: "continue", ...picks() }),
    });
    if (!resp.ok) throw await failure(resp);
    $("input").value = "";
    addUser(content);
    await followRun(resp, new AssistantView(), { conversation_id: state.conversation, last_id: 0, text: "" });
  } catch (exc) {
    problem(exc.message);
  } finally {
    running(null);
  }
}

async function stop() {
  if (!state.run) return;
  if (state.run === "starting") { state.stopPending = true; return; } // sent once the run is known
  try {
    await api("POST", `/api/runs/${state.run}/cancel`);
  } catch (exc) {
    problem(exc.message);
  }
}

async function loadConversations() {
  const { data } = await api("GET", "/api/conversations?limit=100");
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of data) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.testid = "conversation";
    button.textContent = conv.title || "untitled";
    button.classList.toggle("current", conv.id === state.conversation);
    button.addEventListener("click", () => openConversation(conv.id).catch((exc) => problem(exc.message)));
    li.append(button);
    list.append(li);
  }
}

const WATCH_MAX = 3; // replies going elsewhere followed at once (see openConversation)
let viewing = null; // the follows of the conversation on screen (aborted when another opens)

// ``own``: the tab's own re-join opens its run's conversation (the page is busy with it
// already, so a click in the meantime is ignored, not run over it).
async function openConversation(id, skipRun = null, own = false) {
  if (state.run && !own) return;
  if (viewing) viewing.abort();
  const mine = (viewing = new AbortController());
  const conv = await api("GET", `/api/conversations/${id}`);
  if (mine.signal.aborted) return; // another conversation was opened meanwhile
  state.conversation = id;
  $("messages").replaceChildren();
  const pending = []; // replies whose run is still going (another tab's, or before a reopen)
  for (const m of conv.messages) {
    if (m.role === "user") addUser(m.content);
    else if (m.role === "assistant" && !(skipRun && m.run_id === skipRun)) {
      const view = new AssistantView(m.content);
      if (m.status === "cancelled") view.note(...stopped(m.error));
      else if (m.status === "error") view.note(m.error ? `failed: ${m.error}` : "failed");
      else if (m.status === "pending" && m.run_id) pending.push({ view, run_id: m.run_id });
    }
  }
  for (const b of document.querySelectorAll("#conversations button")) b.classList.remove("current");
  await loadConversations();
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
  if (!live || !live.run_id) return;
  try {
    await rejoinRun(live);
  } catch (exc) {
    // Gone (its conversation deleted) or not this key's: told once, then forgotten.
    if (exc.status >= 400 && exc.status < 500) sessionStorage.removeItem(LIVE);
    throw exc;
  }
}

async function rejoinRun(live) {
  running(live.run_id); // busy from here: a click on a conversation now would run over it
  try {
    await openConversation(live.conversation_id, live.run_id, true);
    const resp = await fetch(`/api/runs/${live.run_id}/events`, {
      headers: headers({ "Last-Event-ID": String(live.last_id) }),
    });
    if (resp.status === 204) { // it ended while the page was away, and was seen to the end
      sessionStorage.removeItem(LIVE);
      running(null);
      await openConversation(live.conversation_id);
      return;
    }
    if (!resp.ok) throw await failure(resp);
    await followRun(resp, new AssistantView(live.text || "", live.steps || []), live);
  } finally {
    running(null);
  }
}

async function loadModels() {
  try {
    const { data } = await api("GET", "/v1/models");
    for (const model of data) $("model").append(new Option(model.id, model.id));
  } catch { /* no backend reachable yet: the default model */ }
}

async function start() {
  problem("");
  try {
    await loadConversations();
    $("key-form").hidden = true;
    await loadModels();
    await rejoin();
  } catch (exc) {
    problem(exc.message);
  }
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("stop").addEventListener("click", stop);
$("new").addEventListener("click", () => {
  if (state.run) return;
  state.conversation = null;
  $("messages").replaceChildren();
  loadConversations().catch((exc) => problem(exc.message));
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
