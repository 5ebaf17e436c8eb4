// layerchain gateway dashboard: polls /api/swarm, streams chat from /v1/chat/completions.
// Plain JavaScript, no libraries (the page must work offline). Text from the network is
// only ever put into the page with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const $ = (sel) => document.querySelector(sel);
const chat = { messages: [], busy: false };
let lastState = null;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

const short = (id) => (id || "").slice(0, 10);
const fmt = (x, digits = 1) => (x == null ? "–" : Number(x).toFixed(digits));

// ------------------------------------------------------------------ swarm view

// With API keys on, /api/swarm needs a key too (it shows the key's own requests; an admin
// key sees all): the one typed in the chat box.
function authHeaders() {
  const key = $("#chat-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function poll() {
  try {
    const res = await fetch("/api/swarm", { cache: "no-store", headers: authHeaders() });
    if (res.status === 401) {
      $("#chat-key-label").style.display = "";
      const s = $("#status");
      s.textContent = "enter an API key (chat box) to see the swarm";
      s.className = "pill bad";
      return;
    }
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    lastState = await res.json();
    render(lastState);
  } catch (err) {
    const s = $("#status");
    s.textContent = `gateway unreachable (${err.message})`;
    s.className = "pill bad";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function render(state) {
  const m = state.model;
  $("#model").textContent = `${m.name} · ${m.num_blocks} blocks · ${m.model_id.slice(0, 12)}`;
  const status = $("#status");
  status.textContent = state.covered ? "all blocks covered" : "gaps: no route";
  status.className = "pill " + (state.covered ? "ok" : "bad");
  const t = state.totals;
  $("#totals").textContent =
    `${t.requests} requests · ${t.prompt_tokens + t.completion_tokens} tokens · ` +
    `${t.cost} credits · ${t.errors} errors · keys ${state.keys_required ? "required" : "off"}`;
  $("#chat-key-label").style.display = state.keys_required ? "" : "none";
  renderCoverage(state);
  renderNodes(state.nodes);
  renderRequests(state.requests);
}

function renderCoverage(state) {
  const L = state.model.num_blocks;
  const bar = $("#coverage");
  bar.replaceChildren(...state.coverage.map((n, b) =>
    el("div", { class: `block n${Math.min(n, 3)}`, title: `block ${b}: ${n} node(s)`, "data-count": n })));
  $("#coverage-axis").replaceChildren(el("span", { text: "0" }), el("span", { text: String(L) }));
  const gaps = state.coverage.filter((n) => n === 0).length;
  $("#coverage-label").textContent = gaps ? `${gaps} of ${L} blocks unserved` : `blocks 0..${L}`;
  $("#spans").replaceChildren(...state.nodes.map((n) => {
    const bar = el("div", {
      class: "span-bar" + (n.banned ? " banned" : ""),
      text: `${short(n.peer_id)} [${n.start}:${n.end}]`,
      title: `${n.peer_id} serves blocks ${n.start}..${n.end - 1}`,
    });
    bar.style.left = `${(100 * n.start) / L}%`;
    bar.style.width = `${(100 * (n.end - n.start)) / L}%`;
    return el("div", { class: "span-row" }, bar);
  }));
}

function renderNodes(nodes) {
  $("#node-count").textContent = `${nodes.length} in the swarm`;
  $("#nodes tbody").replaceChildren(...nodes.map((n) => el("tr", { "data-peer-id": n.peer_id },
    el("td", { class: "mono", text: n.peer_id, title: n.endpoint }),
    el("td", { text: `${n.start}:${n.end}` }),
    el("td", { text: fmt(n.ms_per_block, 2) }),
    el("td", { text: fmt(n.tokens_per_s) }),
    el("td", { text: String(n.price_per_block) }),
    el("td", { text: n.rtt_ms == null ? "–" : `${fmt(n.rtt_ms, 2)} ms` }),
    el("td", { text: `${n.free_cache_tokens} tokens` }),
    el("td", { class: n.banned ? "state-bad" : "state-ok", text: n.banned ? "banned" : "serving" }),
  )));
}

function chain(route) {
  const node = el("div", { class: "chain" }, el("span", { class: "end", text: "client" }));
  for (const hop of route) {
    node.append(el("span", { class: "arrow", text: "→" }),
      el("span", { class: "hop", text: `${short(hop.peer_id)} [${hop.start}:${hop.end}]`,
                   title: hop.peer_id }));
  }
  node.append(el("span", { class: "arrow", text: "→" }), el("span", { class: "end", text: "client" }));
  return node;
}

function renderRequests(requests) {
  $("#requests").replaceChildren(...requests.map((r) => {
    const when = new Date(r.created * 1000).toLocaleTimeString();
    const who = r.user || r.key_id || "anonymous";
    const head = el("div", { class: "req-head" },
      el("span", { class: `status ${r.status}`, text: r.status }),
      el("span", { text: when }),
      el("span", { text: `${r.kind}${r.stream ? " · stream" : ""}` }),
      el("span", { text: who }),
      el("span", { text: `${r.prompt_tokens} → ${r.completion_tokens} tokens` }),
      el("span", { text: `${fmt(r.tokens_per_s)} tok/s` }),
      el("span", { text: `first token ${fmt(r.ttft_s, 2)} s` }),
      el("span", { text: `${r.cost} credits` }));
    const item = el("li", { "data-request-id": r.id, "data-status": r.status, "data-user": r.user || "" }, head);
    if (r.route.length) item.append(chain(r.route));
    if (r.error) item.append(el("div", { class: "req-error", text: r.error }));
    return item;
  }));
}

// ------------------------------------------------------------------ chat

function addMessage(role, text) {
  const node = el("div", { class: `msg ${role}` }, el("span", { class: "text", text }));
  $("#chat-log").append(node);
  $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
  return node;
}

// Reads server-sent events from a fetch() body; calls onData(json) for each `data:` line.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  chat.busy = true;
  $("#chat-send").disabled = true;
  chat.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.setAttribute("data-state", "streaming");
  let chunks = 0;
  const body = {
    model: lastState ? lastState.model.name : undefined,
    messages: chat.messages,
    stream: true,
    max_tokens: Number($("#chat-max-tokens").value) || 64,
    temperature: Number($("#chat-temperature").value) || 0,
    user: "dashboard",
  };
  const headers = { "Content-Type": "application/json", ...authHeaders() };
  const textNode = answer.querySelector(".text");
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body) });
    if (!res.ok) {
      const err = await res.json().catch(() => ({ error: { message: `HTTP ${res.status}` } }));
      throw new Error(err.error ? err.error.message : `HTTP ${res.status}`);
    }
    let meta = null;
    await readEvents(res, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        textNode.textContent += delta;
        chunks += 1;
        answer.setAttribute("data-chunks", String(chunks));
        $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
      }
      if (chunk.layerchain) meta = { ext: chunk.layerchain, usage: chunk.usage };
    });
    chat.messages.push({ role: "assistant", content: textNode.textContent });
    if (meta) {
      answer.append(el("span", { class: "meta",
        text: `${meta.usage ? meta.usage.completion_tokens : "?"} tokens · ` +
              `${fmt(meta.ext.tokens_per_s)} tok/s · ${meta.ext.cost} credits` }), chain(meta.ext.route));
      $("#chat-log").scrollTop = $("#chat-log").scrollHeight;
    }
    answer.setAttribute("data-state", "done");
  } catch (err) {
    answer.setAttribute("data-state", "error");
    answer.classList.add("error");
    textNode.textContent += (textNode.textContent ? "\n" : "") + `error: ${err.message}`;
    chat.messages.pop();  // the question stays unanswered: do not send it twice
  } finally {
    chat.busy = false;
    $("#chat-send").disabled = false;
  }
}

$("#chat-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || chat.busy) return;
  input.value = "";
  send(text);
});
$("#chat-clear").addEventListener("click", () => {
  chat.messages = [];
  $("#chat-log").replaceChildren();
});
const savedKey = window.localStorage.getItem("layerchain-key");
if (savedKey) $("#chat-key").value = savedKey;
$("#chat-key").addEventListener("change", (e) => window.localStorage.setItem("layerchain-key", e.target.value));

// ------------------------------------------------------------------ training jobs

const TRAIN_POLL_MS = 5000;

async function pollTraining() {
  try {
    const res = await fetch("/api/train/jobs", { cache: "no-store", headers: authHeaders() });
    if (res.ok) renderTraining((await res.json()).jobs);
  } catch (err) {
    // the swarm poll reports an unreachable gateway
  } finally {
    setTimeout(pollTraining, TRAIN_POLL_MS);
  }
}

function renderTraining(jobs) {
  const rows = jobs.map((job) => {
    const checkpoint = job.checkpoints.length ? job.checkpoints[job.checkpoints.length - 1] : "–";
    return el("tr", {},
      el("td", { class: "mono", text: job.job_id }), el("td", { text: job.kind }),
      el("td", { text: job.error ? `${job.status}: ${job.error}` : job.status }),
      el("td", { text: String(job.step) }), el("td", { text: fmt(job.loss, 4) }),
      el("td", { text: String(job.peers.length), title: job.peers.join("\n") }),
      el("td", { class: "mono", text: checkpoint.split("/").pop(), title: checkpoint }));
  });
  $("#train-jobs tbody").replaceChildren(...rows);
  $("#training-section").style.display = jobs.length ? "" : "none";
}

poll();
pollTraining();
