"""The chat page served at `/`: one HTML page, its style sheet and script, with no external resources.

A page of our own rather than Gradio's ChatInterface: Gradio adds ~40 MB of wheels (12 packages) to the serve
extra, its default theme fetches web fonts from Google (nothing outside loopback is reachable in CI), and it
would talk to the model through its own queue instead of the OpenAI API this server exists to provide. This
page is a client of that API: it streams `/v1/chat/completions` with `fetch` and reads the server-sent events
itself (EventSource cannot POST).

Model output is only ever inserted with `textContent`, never as HTML, so a reply like `<img onerror=...>` shows
as text. The server also sends a Content-Security-Policy without 'unsafe-inline' as a second line of defence.
Defaults follow the SmolLM2-Instruct model card (temperature 0.2, top-p 0.9).
"""

from __future__ import annotations

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>SmolLM2 chat</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="chat.css">
</head>
<body>
<header>
  <h1>SmolLM2 chat</h1>
  <span id="model" title="the model this server runs">loading…</span>
  <span id="speed" aria-live="polite"></span>
</header>
<main>
  <aside id="settings">
    <label for="system">System prompt</label>
    <textarea id="system" rows="4" placeholder="(the model's default)"></textarea>
    <label for="temperature">Temperature <output id="temperature-value"></output></label>
    <input id="temperature" type="range" min="0" max="2" step="0.05" value="0.2">
    <label for="top_p">Top-p <output id="top_p-value"></output></label>
    <input id="top_p" type="range" min="0.05" max="1" step="0.05" value="0.9">
    <label for="max_tokens">Max new tokens</label>
    <input id="max_tokens" type="number" min="1" max="8192" step="1" value="256">
    <label for="api_key">API key</label>
    <input id="api_key" type="password" autocomplete="off" placeholder="if the server needs one">
    <button id="clear" type="button">New chat</button>
  </aside>
  <section id="chat">
    <div id="messages" aria-live="polite"></div>
    <form id="composer">
      <textarea id="input" rows="2" placeholder="Message SmolLM2 (Enter to send, Shift+Enter for a new line)"
                required></textarea>
      <button id="send" type="submit">Send</button>
      <button id="stop" type="button" hidden>Stop</button>
    </form>
  </section>
</main>
<script src="chat.js"></script>
</body>
</html>
"""

STYLE = """
:root { color-scheme: light dark; --bg: #f7f7f8; --panel: #fff; --text: #1f2328; --muted: #656d76;
        --user: #dbeafe; --assistant: #fff; --border: #d0d7de; --accent: #2563eb; --error: #b42318; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0d1117; --panel: #161b22; --text: #e6edf3; --muted: #8d96a0; --user: #1e3a5f;
          --assistant: #161b22; --border: #30363d; --accent: #4493f8; --error: #f97066; }
}
* { box-sizing: border-box; }
body { margin: 0; height: 100vh; display: flex; flex-direction: column; background: var(--bg); color: var(--text);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; align-items: baseline; gap: 1rem; padding: .6rem 1rem; border-bottom: 1px solid var(--border);
         background: var(--panel); }
header h1 { font-size: 1.1rem; margin: 0; }
#model { font-family: ui-monospace, monospace; font-size: .85rem; color: var(--muted); }
#speed { margin-left: auto; font-size: .85rem; color: var(--muted); }
main { flex: 1; display: flex; min-height: 0; }
#settings { width: 250px; padding: 1rem; display: flex; flex-direction: column; gap: .35rem;
            border-right: 1px solid var(--border); background: var(--panel); overflow-y: auto; }
#settings label { font-size: .8rem; font-weight: 600; color: var(--muted); margin-top: .5rem; }
#settings output { font-weight: 400; }
textarea, input[type=number], input[type=password] { width: 100%; font: inherit; color: inherit; padding: .4rem;
  background: var(--bg); border: 1px solid var(--border); border-radius: 6px; resize: vertical; }
button { font: inherit; padding: .45rem .9rem; border-radius: 6px; border: 1px solid var(--border);
         background: var(--panel); color: inherit; cursor: pointer; }
button[type=submit] { background: var(--accent); border-color: var(--accent); color: #fff; }
button:disabled { opacity: .5; cursor: default; }
#clear { margin-top: 1rem; }
#chat { flex: 1; display: flex; flex-direction: column; min-width: 0; }
#messages { flex: 1; overflow-y: auto; padding: 1rem; display: flex; flex-direction: column; gap: .75rem; }
.msg { max-width: 48rem; padding: .6rem .8rem; border-radius: 10px; border: 1px solid var(--border); }
.msg .role { font-size: .75rem; font-weight: 600; color: var(--muted); margin-bottom: .15rem; }
.msg .content { white-space: pre-wrap; overflow-wrap: anywhere; }
.msg.user { align-self: flex-end; background: var(--user); }
.msg.assistant { align-self: flex-start; background: var(--assistant); }
.msg.pending .content:empty::after { content: "…"; color: var(--muted); }
.msg .note { font-size: .8rem; color: var(--muted); margin-top: .25rem; }
.msg.error { border-color: var(--error); color: var(--error); }
#composer { display: flex; gap: .5rem; padding: .75rem 1rem; border-top: 1px solid var(--border);
            background: var(--panel); }
#composer textarea { flex: 1; }
@media (max-width: 700px) { main { flex-direction: column; } #settings { width: auto; border-right: 0; } }
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const turns = [];  // the finished conversation: {role, content}, without the system prompt
let modelName = null;
let controller = null;  // aborts the reply being streamed (the server then stops generating it)

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return "HTTP " + response.status; }
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", {headers: headers()});
    if (!response.ok) throw new Error(await errorMessage(response));
    modelName = (await response.json()).data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "model unavailable: " + e.message;
  }
}

// One message bubble; its text is always set with textContent, so model output can never become HTML.
function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  box.append(label, content);
  $("messages").append(box);
  box.scrollIntoView({block: "end"});
  return box;
}

function addNote(box, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  box.append(note);
}

// The `data:` payloads of a server-sent-event stream, as they arrive.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  if (!modelName) await loadModel();
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...turns, {role: "user", content: text});
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("pending");
  const content = box.querySelector(".content");
  const body = {
    model: modelName, messages, stream: true, stream_options: {include_usage: true},
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let firstAt = null, reply = "", usage = null, finish = null, failed = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (choice.delta && choice.delta.content) {
        if (firstAt === null) firstAt = performance.now();
        reply += choice.delta.content;
        content.textContent = reply;
        box.scrollIntoView({block: "end"});
      }
    }
    const seconds = (performance.now() - (firstAt ?? start)) / 1000;
    const tokens = usage ? usage.completion_tokens : 0;
    const rate = tokens > 1 && seconds > 0 ? ((tokens - 1) / seconds).toFixed(1) : "–";
    const first = firstAt === null ? "–" : ((firstAt - start) / 1000).toFixed(2) + " s";
    $("speed").textContent = `${tokens} tokens · ${rate} tokens/s · first token ${first}`;
    if (finish === "length") addNote(box, "(stopped at max new tokens)");
  } catch (e) {
    if (e.name === "AbortError") {
      addNote(box, "(stopped)");
    } else {
      failed = true;
      box.classList.add("error");
      addNote(box, "Error: " + e.message);
    }
  } finally {
    box.classList.remove("pending");
    box.dataset.done = "true";
    setBusy(false);
    controller = null;
  }
  // A reply cut short by Stop stays in the conversation, as shown; a failed turn is left out.
  if (!failed) turns.push({role: "user", content: text}, {role: "assistant", content: reply});
}

for (const id of ["temperature", "top_p"]) {
  const show = () => { $(id + "-value").textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  turns.length = 0;
  $("messages").replaceChildren();
  $("speed").textContent = "";
});
$("api_key").addEventListener("change", loadModel);
loadModel();
"""
