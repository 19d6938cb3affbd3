// The nanoseek web chat: streams /v1/chat/completions, the reasoning (reasoning_content) in a collapsible block
// apart from the answer (content). Conversations are kept in this browser's localStorage; like DeepSeek's API, the
// history sent back holds the answers, not the reasoning.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "nanoseek-chat";
const saved = JSON.parse(localStorage.getItem(STORE) || '{"conversations": [], "settings": {}}');
let conversation = null; // {id, title, turns: [{role, content, reasoning?, meta?}]}
let controller = null; // the AbortController of the reply being streamed
let model = null;

function persist() {
  saved.settings = { temperature: $("temperature").value, maxTokens: $("max-tokens").value,
                     effort: $("effort").value, apiKey: $("api-key").value };
  localStorage.setItem(STORE, JSON.stringify(saved));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api-key").value) h.Authorization = `Bearer ${$("api-key").value}`;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(`${await apiError(response)}${response.status === 401 ? " (set the API key in Settings)" : ""}`);
    return;
  }
  model = (await response.json()).data[0].id;
  $("model-name").textContent = model;
}

// ---------------------------------------------------------------- rendering
function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const c of saved.conversations) {
    const item = document.createElement("li");
    item.textContent = c.title || "(empty)";
    item.title = c.title;
    item.classList.toggle("current", conversation !== null && c.id === conversation.id);
    item.addEventListener("click", () => { if (!controller) open(c); });
    list.append(item);
  }
}

function bubble(turn) {
  const div = document.createElement("div");
  div.className = `message ${turn.role}`;
  if (turn.role === "user") {
    div.textContent = turn.content;
    return { div };
  }
  const thinking = document.createElement("details");
  thinking.className = "thinking";
  const summary = document.createElement("summary");
  const thought = document.createElement("div");
  thought.className = "thinking-text";
  thinking.append(summary, thought);
  const answer = document.createElement("div");
  answer.className = "answer";
  const meta = document.createElement("div");
  meta.className = "meta";
  div.append(thinking, answer, meta);
  const view = { div, thinking, summary, thought, answer, meta };
  fill(view, turn);
  return view;
}

function fill(view, turn) {
  view.thought.textContent = turn.reasoning || "";
  view.thinking.hidden = !turn.reasoning;
  view.summary.textContent = turn.thinkingDone === false ? "Thinking…" : "Thought";
  view.answer.textContent = turn.content;
  view.meta.textContent = turn.meta || "";
}

function open(c) {
  conversation = c;
  const box = $("messages");
  box.replaceChildren(...c.turns.map((turn) => bubble(turn).div));
  box.scrollTop = box.scrollHeight;
  renderHistory();
}

function newConversation() {
  open({ id: Date.now().toString(36), title: "", turns: [] });
}

// ---------------------------------------------------------------- sending
async function send(text) {
  showError("");
  if (conversation.turns.length === 0) {
    conversation.title = text.slice(0, 60);
    saved.conversations.unshift(conversation);
  }
  conversation.turns.push({ role: "user", content: text });
  const turn = { role: "assistant", content: "", reasoning: "", thinkingDone: false };
  conversation.turns.push(turn);
  const box = $("messages");
  box.append(bubble(conversation.turns.at(-2)).div);
  const view = bubble(turn);
  view.thinking.open = true;
  box.append(view.div);
  renderHistory();

  const body = {
    messages: conversation.turns.slice(0, -1).map((t) => ({ role: t.role, content: t.content })),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (model) body.model = model;
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if ($("max-tokens").value !== "") body.max_tokens = Number($("max-tokens").value);
  if ($("effort").value) body.reasoning_effort = $("effort").value;

  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await apiError(response));
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) {
        const u = event.usage;
        turn.meta = `${u.completion_tokens} tokens (${u.completion_tokens_details.reasoning_tokens} reasoning), ` +
                    `${((performance.now() - started) / 1000).toFixed(1)} s`;
      }
      for (const choice of event.choices) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) turn.reasoning += delta.reasoning_content;
        if (delta.content) {
          if (!turn.thinkingDone) { turn.thinkingDone = true; view.thinking.open = false; }
          turn.content += delta.content;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      fill(view, turn);
      box.scrollTop = box.scrollHeight;
    }
    if (finish === "length") turn.meta = `${turn.meta || ""} (cut at max tokens)`.trim();
  } catch (e) {
    if (e.name === "AbortError") turn.meta = "(stopped)";
    else showError(e.message);
  } finally {
    turn.thinkingDone = true;
    fill(view, turn);
    controller = null;
    setBusy(false);
    persist();
  }
}

// Server-sent events of a fetch response -> the parsed `data:` objects, up to `data: [DONE]`.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
  if (!busy) $("input").focus();
}

// ---------------------------------------------------------------- wiring
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
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => { if (!controller) newConversation(); });
for (const id of ["temperature", "max-tokens", "effort"]) $(id).addEventListener("change", persist);
$("api-key").addEventListener("change", () => { persist(); loadModel(); });

const s = saved.settings;
$("temperature").value = s.temperature || "";
$("max-tokens").value = s.maxTokens || "";
$("effort").value = s.effort || "";
$("api-key").value = s.apiKey || "";
newConversation();
loadModel();
