// kubetune dashboard: plain JavaScript, no build step. Reads /api/* (runs, curves, eval, sweeps) and
// the OpenAI API (/v1/models, /v1/chat/completions) with the key typed in, kept in this browser only.
"use strict";

const COLORS = ["#2f6fed", "#e4572e", "#17a398", "#f3a712", "#8e44ad", "#6b7385", "#c0392b", "#1b8a4b"];
const state = { tab: "runs", selected: null, key: localStorage.getItem("kubetune-key") || "", history: [] };

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style" || k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function get(path) {
  const res = await fetch(path, { headers: headers(false) });
  if (res.status === 401) throw new Error("this server needs an API key: enter it above");
  const body = await res.json();
  if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
  return body;
}

function say(text) { $("#status").textContent = text; }

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Math.abs(value) > 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return value.toFixed(digits).replace(/\.?0+$/, "");
}

function ago(t) {
  if (!t) return "–";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return new Date(t * 1000).toLocaleString();
}

// Line chart: series = [{name, color, points: [[x, y], ...], dots: bool}] into an <svg>.
function chart(svg, series) {
  const w = svg.clientWidth || 320, h = svg.clientHeight || 200, pad = { l: 46, r: 8, t: 8, b: 22 };
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const pts = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    svg.append(node);
    return node;
  };
  if (!pts.length) {
    add("text", { x: w / 2 - 30, y: h / 2 }).textContent = "no data yet";
    return;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x0 === x1) x1 = x0 + 1;
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (y) => h - pad.b - ((y - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  add("line", { class: "axis", x1: pad.l, y1: h - pad.b, x2: w - pad.r, y2: h - pad.b });
  add("line", { class: "axis", x1: pad.l, y1: pad.t, x2: pad.l, y2: h - pad.b });
  add("text", { x: 2, y: pad.t + 8 }).textContent = fmt(y1, 3);
  add("text", { x: 2, y: h - pad.b }).textContent = fmt(y0, 3);
  add("text", { x: pad.l, y: h - 6 }).textContent = String(x0);
  add("text", { x: w - pad.r - 24, y: h - 6 }).textContent = String(x1);
  for (const s of series) {
    const good = s.points.filter((p) => Number.isFinite(p[1]));
    if (!good.length) continue;
    if (s.dots) {
      for (const [x, y] of good) add("circle", { class: "point", cx: X(x), cy: Y(y), r: 3.5, fill: s.color });
    } else {
      const d = good.map(([x, y], i) => `${i ? "L" : "M"}${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join("");
      const path = add("path", { class: "series", d, stroke: s.color });
      path.dataset.name = s.name;
      path.dataset.points = String(good.length);
    }
  }
}

// Runs

async function refreshRuns() {
  const { runs } = await get("/api/runs");
  const body = $("#runs tbody");
  body.replaceChildren(...runs.map((r) => {
    const pct = r.total_steps ? Math.min(100, (100 * r.step) / r.total_steps) : r.status === "succeeded" ? 100 : 0;
    const row = el("tr", { "data-id": r.id },
      el("td", {}, el("strong", {}, r.name), el("div", { class: "muted" }, r.model || "")),
      el("td", {}, r.source === "job" ? "job" : r.source),
      el("td", {}, el("span", { class: `badge ${r.status}` }, r.status.replace("_", " "))),
      el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${pct}%` })),
        r.total_steps ? `${r.step}/${r.total_steps}` : ""),
      el("td", {}, fmt(r.loss)), el("td", {}, fmt(r.eval_loss)), el("td", {}, ago(r.updated)));
    if (r.id === state.selected) row.classList.add("selected");
    row.addEventListener("click", () => { state.selected = r.id; refreshDetail(); refreshRuns(); });
    return row;
  }));
  $("#runs-empty").hidden = runs.length > 0;
  if (!state.selected && runs.length) { state.selected = runs[0].id; refreshDetail(); }
}

async function refreshDetail() {
  if (!state.selected) return;
  const id = state.selected;
  const d = await get(`/api/run?id=${encodeURIComponent(id)}`);
  if (id !== state.selected) return;  // another run was picked while this one loaded: its answer is stale
  $("#detail").hidden = false;
  $("#detail").dataset.id = d.run.id;
  $("#detail-title").textContent = d.run.name;
  const eta = d.run.eta_s ? ` · about ${Math.round(d.run.eta_s)} s left` : "";
  $("#detail-meta").textContent = `${d.run.status} · ${d.run.method || ""} on ${d.run.model || "?"} · ${d.run.source}${eta}`;
  const steps = (key) => d.curves.map((c) => [c.step, c[key]]);
  chart($("#loss-chart"), [
    { name: "train loss", color: COLORS[0], points: steps("loss") },
    { name: "eval loss", color: COLORS[1], points: d.evals.map((e) => [e.step, e.loss]), dots: true },
  ]);
  chart($("#lr-chart"), [{ name: "learning rate", color: COLORS[2], points: steps("learning_rate") }]);
  chart($("#tps-chart"), [{ name: "tokens/s", color: COLORS[3], points: steps("tokens_per_s") }]);
  renderEval(d.eval);
}

function renderEval(ev) {
  let metrics = ev.metrics || {};
  if (!metrics.base && !metrics.tuned && Object.keys(metrics).length) metrics = { value: metrics };  // dpo, kto
  const models = ["base", "tuned", "value"].filter((m) => metrics[m]);
  $("#eval").hidden = !models.length && !(ev.samples || []).length;
  const keys = [...new Set(models.flatMap((m) => Object.keys(metrics[m])))].sort();
  $("#eval-metrics thead").replaceChildren(el("tr", {}, el("th", {}, "metric"), ...models.map((m) => el("th", {}, m))));
  $("#eval-metrics tbody").replaceChildren(...keys.map((k) =>
    el("tr", {}, el("td", {}, k), ...models.map((m) => el("td", {}, fmt(metrics[m][k]))))));
  $("#eval-samples tbody").replaceChildren(...(ev.samples || []).map((s) =>
    el("tr", {}, el("td", {}, s.prompt), el("td", {}, s.reference), el("td", {}, s.base ?? "–"), el("td", {}, s.tuned ?? "–"))));
}

// Sweeps

async function refreshSweeps() {
  const { sweeps } = await get("/api/sweeps");
  $("#sweeps-empty").hidden = sweeps.length > 0;
  $("#sweeps").replaceChildren(...sweeps.map((sw) => {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "chart");
    const box = el("div", { class: "sweep", "data-sweep": sw.sweep },
      el("h3", {}, `${sw.sweep} — ranked by ${sw.metric} (${sw.lower_is_better ? "lower" : "higher"} is better)`),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "#"), el("th", {}, "Run"), el("th", {}, sw.metric), el("th", {}, "Status"))),
        el("tbody", {}, ...sw.runs.map((r, i) => el("tr", {},
          el("td", {}, String(i + 1)),
          el("td", {}, el("span", { class: "legend", style: `background:${COLORS[i % COLORS.length]}` }), r.name),
          el("td", {}, fmt(r.value)), el("td", {}, el("span", { class: `badge ${r.status}` }, r.status)))))),
      svg);
    requestAnimationFrame(() => chart(svg, sw.runs.map((r, i) => ({ name: r.name, color: COLORS[i % COLORS.length], points: r.curve }))));
    return box;
  }));
}

// Playground

async function refreshModels() {
  const { data } = await get("/v1/models");
  const select = $("#model");
  const current = select.value;
  select.replaceChildren(...data.map((m) => el("option", { value: m.id }, m.id)));
  if (data.some((m) => m.id === current)) select.value = current;
  $("#send").disabled = !data.length;
  if (!data.length) say("no model to chat with yet: a job must succeed first");
}

function addTurn(role, text) {
  const turn = el("div", { class: `turn ${role}` }, text);
  $("#conversation").append(turn);
  return turn;
}

async function send(event) {
  event.preventDefault();
  const text = $("#message").value.trim();
  if (!text || !$("#model").value) return;
  $("#message").value = "";
  state.history.push({ role: "user", content: text });
  addTurn("user", text);
  const answer = addTurn("assistant", "");
  answer.id = "playground-answer";
  document.querySelectorAll("#playground-answer").forEach((n) => { if (n !== answer) n.removeAttribute("id"); });
  const messages = ($("#system").value ? [{ role: "system", content: $("#system").value }] : []).concat(state.history);
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true),
      body: JSON.stringify({ model: $("#model").value, messages, stream: true, max_tokens: 256,
                             temperature: Number($("#temperature").value) }),
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : res.statusText);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const parts = buffer.split("\n\n");
      buffer = parts.pop();
      for (const part of parts) {
        const data = part.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta : {};
        answer.textContent += delta.content || "";
      }
    }
    answer.dataset.done = "true";
    state.history.push({ role: "assistant", content: answer.textContent });
  } catch (err) {
    answer.classList.add("error");
    answer.textContent = String(err.message || err);
    answer.dataset.done = "true";
    state.history.pop();
  }
}

// Tabs, key, refresh loop

function show(tab) {
  state.tab = tab;
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  document.querySelectorAll(".tab").forEach((s) => { s.hidden = s.id !== `tab-${tab}`; });
  tick();
}

async function tick() {
  try {
    if (state.tab === "runs") { await refreshRuns(); await refreshDetail(); }
    else if (state.tab === "sweeps") await refreshSweeps();
    else if (state.tab === "playground" && document.activeElement !== $("#model")) await refreshModels();
    say(`updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    say(String(err.message || err));
  }
}

document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.tab)));
$("#key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("#key").value.trim();
  localStorage.setItem("kubetune-key", state.key);
  $("#key").value = "";
  tick();
});
$("#chat-form").addEventListener("submit", send);
$("#clear").addEventListener("click", () => { state.history = []; $("#conversation").replaceChildren(); });
show(location.hash === "#playground" ? "playground" : location.hash === "#sweeps" ? "sweeps" : "runs");
setInterval(tick, 3000);
