// The connector's inspector: requests live from server-sent events, a detail view with a
// waterfall, replay of captured requests, usage charts and the LLM/relay timeline.
"use strict";

const rows = new Map();   // seq -> {summary, tr}
const seen = {key: new Set(), model: new Set(), outcome: new Set()};
let selected = null;
let usage = null;

// llm_error: the LLM's own 5xx answer, relayed as it was (an error by its status)
const BAD = new Set(["bridge_error", "aborted", "upstream_error", "idle_timeout", "client_stalled",
                     "reset", "relay_lost", "too_large", "cancelled", "llm_error"]);
// what the usage store counts a request under when it named no model
const NO_MODEL = "unknown";

function outcomeClass(o) {
  if (o === "ok") return "outcome-ok";
  if (o === "refused") return "outcome-refused";
  if (o === "in progress") return "outcome-live";
  return BAD.has(o) ? "outcome-bad" : "";
}

function cells(r) {
  return [
    el("td", {}, clock(r.time)),
    el("td", {}, r.key || "–"),
    el("td", {}, r.model || "–"),
    el("td", {}, `${r.method} ${r.path}`, r.replay_of ? " (replay)" : ""),
    el("td", {class: r.status >= 500 ? "status-5xx" : r.status >= 400 ? "status-4xx" : ""}, r.status ?? "–"),
    el("td", {class: outcomeClass(r.outcome)}, r.outcome),
    el("td", {class: "num"}, ms(r.queue_wait_ms)),
    el("td", {class: "num"}, ms(r.ttfb_ms)),
    el("td", {class: "num"}, ms(r.duration_ms)),
    el("td", {class: "num"}, r.tokens === null ? "–" : r.tokens + (r.tokens_estimated ? "*" : "")),
    el("td", {class: "num"}, r.tokens_per_second ?? "–"),
    el("td", {}, r.reset || ""),
  ];
}

function addFilterValue(name, value) {
  if (!value || seen[name].has(value)) return;
  seen[name].add(value);
  document.getElementById("f-" + name).append(el("option", {value}, value));
}

function visible(r) {
  const f = n => document.getElementById("f-" + n).value;
  return (!f("key") || r.key === f("key")) && (!f("model") || r.model === f("model")) &&
         (!f("outcome") || r.outcome === f("outcome"));
}

function upsert(r, atTop) {
  let entry = rows.get(r.seq);
  const tr = entry ? entry.tr : el("tr", {"data-seq": String(r.seq), "data-id": r.id});
  tr.replaceChildren(...cells(r));
  tr.hidden = !visible(r);
  if (!entry) {
    tr.addEventListener("click", () => showDetail(r.seq));
    const body = document.querySelector("#requests tbody");
    atTop ? body.prepend(tr) : body.append(tr);
    entry = {tr};
    rows.set(r.seq, entry);
  }
  entry.summary = r;
  addFilterValue("key", r.key); addFilterValue("model", r.model); addFilterValue("outcome", r.outcome);
  if (selected === r.seq && r.outcome !== "in progress") showDetail(r.seq);
}

function refilter() {
  for (const {tr, summary} of rows.values()) tr.hidden = !visible(summary);
}

function kvTable(id, pairs) {
  document.getElementById(id).replaceChildren(
    ...pairs.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
}

function waterfall(d) {
  // positions through the CSSOM (element.style), which a strict CSP allows
  const total = Math.max(d.duration_ms || 0, 1);
  const pct = v => `${Math.min(100, Math.max(0, (v / total) * 100))}%`;
  const q = d.queue_wait_ms || 0, t = d.ttfb_ms || 0;
  const bar = (label, cls, from, to) => {
    const seg = el("div", {class: "seg " + cls});
    seg.style.left = pct(from);
    seg.style.width = pct(Math.max(to - from, 0));
    return el("div", {class: "bar"}, seg, el("span", {class: "label"}, label));
  };
  const parts = [bar(`queue ${ms(q)}`, "queue", 0, q), bar(`first byte ${ms(t)}`, "ttfb", 0, t)];
  if (d.first_chunk_ms !== null) parts.push(bar(`stream ${ms(total - d.first_chunk_ms)}`, "stream", d.first_chunk_ms, total));
  parts.push(bar(`total ${ms(d.duration_ms)}`, "stream", 0, total));
  document.getElementById("d-waterfall").replaceChildren(...parts);
}

async function showDetail(seq) {
  selected = seq;
  document.querySelectorAll("tr.selected").forEach(t => t.classList.remove("selected"));
  rows.get(seq)?.tr.classList.add("selected");
  const d = await getJSON(`/api/requests/${seq}`);
  const aside = document.getElementById("detail");
  aside.hidden = false;
  aside.dataset.seq = String(seq);
  document.getElementById("d-id").textContent = d.id;
  waterfall(d);
  const facts = [["key", d.key], ["model", d.model || "–"], ["status", d.status ?? "–"],
                 ["outcome", d.outcome], ["bytes in / out", `${d.bytes_in} / ${d.bytes_out}`],
                 ["prompt / completion tokens", `${d.prompt_tokens ?? "–"} / ${d.completion_tokens ?? "–"}` +
                  (d.tokens_estimated ? " (estimated)" : "")],
                 ["tokens/s", d.tokens_per_second ?? "–"], ["reset", d.reset || "–"]];
  if (d.replay_of) facts.push(["replay of", d.replay_of]);
  document.getElementById("d-facts").replaceChildren(
    ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  kvTable("d-req-headers", d.request_headers);
  kvTable("d-resp-headers", d.response_headers);
  const bodies = document.getElementById("d-bodies");
  bodies.replaceChildren();
  if (d.request_body !== null) bodies.append(el("h3", {}, "Request body" + (d.request_truncated ? " (truncated)" : "")), el("pre", {id: "d-request-body"}, d.request_body));
  if (d.response_body !== null) bodies.append(el("h3", {}, "Response body" + (d.response_truncated ? " (truncated)" : "")), el("pre", {id: "d-response-body"}, d.response_body));
  document.getElementById("d-replay").hidden = !(d.captured && !d.request_truncated);
}

async function replay() {
  const seq = Number(document.getElementById("detail").dataset.seq);
  const note = document.getElementById("d-replayed");
  note.textContent = "replaying…";
  const r = await fetch(`/api/replay/${seq}`, {
    method: "POST", credentials: "same-origin", headers: {"X-Trio-Bridge-Admin": "1"},
  });
  const doc = await r.json();
  note.textContent = r.ok ? `replayed: HTTP ${doc.status} (request #${doc.seq})` : `replay failed: ${doc.error?.message ?? doc.error}`;
  note.dataset.status = String(doc.status ?? r.status);
}

function usageText(v) {
  const parts = [`${v.tokens} tok`];
  if (v.requests !== undefined) parts.push(`${v.requests} req`);
  if (v.refused) parts.push(`${v.refused} refused`);
  if (v.errors) parts.push(`${v.errors} err`);
  return parts.join(" · ");
}

function usageRow(name, v, max) {
  const fill = el("div", {class: "fill"});
  fill.style.width = `${(v.tokens / max) * 100}%`;
  const title = name === "other" ? "models this connector does not list, counted together" : name;
  return el("div", {class: "row", "data-name": name}, el("span", {class: "name", title}, name),
            fill, el("span", {class: "num" + (v.errors ? " outcome-bad" : "")}, usageText(v)));
}

function renderUsage() {
  const period = document.getElementById("period").value;
  const data = usage?.periods?.[period] || {keys: {}, models: {}};
  for (const [id, table, isModels] of [["chart-keys", data.keys, false], ["chart-models", data.models, true]]) {
    // requests that named no model (GET /v1/models, or refused before their body was read)
    // are no model: a line under the chart, not a bar
    const entries = Object.entries(table).filter(([name]) => !(isModels && name === NO_MODEL))
      .sort((a, b) => b[1].tokens - a[1].tokens || b[1].requests - a[1].requests);
    const max = Math.max(1, ...entries.map(([, v]) => v.tokens));
    const rows = entries.map(([name, v]) => usageRow(name, v, max));
    const none = isModels ? table[NO_MODEL] : null;
    if (none) {
      rows.push(el("div", {class: "note", "data-no-model": ""},
        `+ ${none.requests} request${none.requests === 1 ? "" : "s"} that named no model (e.g. GET /v1/models, or refused ` +
        `before their body was read)` + (none.refused ? `, ${none.refused} refused` : "") +
        (none.errors ? `, ${none.errors} errors` : "")));
    }
    document.getElementById(id).replaceChildren(...(rows.length ? rows : [el("div", {class: "note"}, "no usage yet")]));
  }
}

async function loadUsage() {
  usage = await getJSON("/api/usage");
  const sel = document.getElementById("period");
  const current = sel.value;
  sel.replaceChildren(...Object.keys(usage.periods).map(p => el("option", {value: p}, p)));
  if (current) sel.value = current;
  renderUsage();
}

async function loadTimeline() {
  const t = await getJSON("/api/timeline");
  const span = 3 * 3600, end = t.now, start = Math.max(end - span, t.since);
  const names = ["llm", ...Object.keys(t.relays)];
  const tracks = names.map(name => {
    const changes = t.events.filter(e => e.what === name);
    const strip = el("div", {class: "strip"});
    let state = changes.length ? (changes[0].state === "up" ? "down" : "up") : (name === "llm" ? t.llm : t.relays[name] === "connected" ? "up" : "down");
    let from = start;
    const segs = [];
    for (const c of changes) {
      if (c.time > from) segs.push([from, Math.min(c.time, end), state]);
      state = c.state; from = Math.max(c.time, start);
    }
    segs.push([from, end, state]);
    for (const [a, b, st] of segs) {
      const seg = el("div", {class: st === "up" ? "up" : "down", title: `${st} from ${clock(a)}`});
      seg.style.left = `${((a - start) / (end - start || 1)) * 100}%`;
      seg.style.width = `${((b - a) / (end - start || 1)) * 100}%`;
      strip.append(seg);
    }
    return el("div", {class: "track"}, el("span", {}, name === "llm" ? "LLM" : name), strip);
  });
  document.getElementById("timeline").replaceChildren(...tracks,
    el("div", {class: "note"}, `since ${clock(start)}; queue: ${t.queue.waiting} waiting, ${t.queue.at_llm} at the LLM`));
  document.getElementById("badges").replaceChildren(
    badge(`LLM ${t.llm}`, t.llm === "up"),
    ...Object.entries(t.relays).map(([u, s]) => badge(`relay ${new URL(u).host} ${s}`, s === "connected")),
    badge(`queue ${t.queue.waiting}`));
}

let usageTimer = null;
function usageSoon() {  // after answers end, at most one refresh every two seconds
  if (!usageTimer) usageTimer = setTimeout(() => { usageTimer = null; loadUsage(); }, 2000);
}

function listen() {
  const live = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.addEventListener("open", () => live.classList.add("on"));
  events.addEventListener("error", () => live.classList.remove("on"));
  events.addEventListener("start", e => upsert(JSON.parse(e.data).request, true));
  events.addEventListener("end", e => { upsert(JSON.parse(e.data).request, true); usageSoon(); });
  events.addEventListener("state", () => loadTimeline());
}

async function main() {
  const doc = await getJSON("/api/requests");
  document.getElementById("capture-note").textContent = doc.capture_bodies
    ? "bodies captured in memory (replay available)" : "bodies not captured ([inspector] capture_bodies)";
  for (const r of doc.requests) upsert(r, false);
  for (const n of ["key", "model", "outcome"]) document.getElementById("f-" + n).addEventListener("change", refilter);
  document.getElementById("d-close").addEventListener("click", () => { document.getElementById("detail").hidden = true; selected = null; });
  document.getElementById("d-replay").addEventListener("click", replay);
  document.getElementById("period").addEventListener("change", renderUsage);
  listen();
  await Promise.all([loadUsage(), loadTimeline()]);
  document.body.dataset.ready = "1";
}

main();
