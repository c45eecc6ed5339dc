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
