// The broker's overview: routes with their recent figures, connectors, aliases.
"use strict";

function pct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + " %"; }

async function refresh() {
  const doc = await getJSON("/api/routes");
  document.getElementById("badges").replaceChildren(
    badge(doc.draining ? "draining" : "serving", !doc.draining),
    badge(`in flight ${doc.in_flight}`), badge(`queued ${doc.queued}`));
  const routes = Object.entries(doc.routes);
  document.querySelector("#routes tbody").replaceChildren(...routes.map(([name, r]) => {
    const s = r.recent || {requests: 0, error_rate: null, time_to_first_byte: {}};
    return el("tr", {"data-route": name}, el("td", {}, name), el("td", {class: "num", "data-queued": ""}, r.queued),
      el("td", {class: "num"}, s.requests),
      el("td", {class: "num"}, pct(s.error_rate)), el("td", {class: "num"}, ms(s.time_to_first_byte.p50_ms)),
      el("td", {class: "num"}, ms(s.time_to_first_byte.p95_ms)), el("td", {class: "num"}, ms(s.time_to_first_byte.p99_ms)));
  }));
  document.querySelector("#connectors tbody").replaceChildren(...routes.flatMap(([route, r]) =>
    r.connectors.map(c => el("tr", {"data-connector": c.name}, el("td", {}, c.name), el("td", {}, route),
      el("td", {}, c.models === null ? "any" : c.models.join(", ")),
      el("td", {class: c.ready && !c.draining ? "outcome-ok" : "outcome-bad"}, c.draining ? "draining" : c.ready ? "ready" : "LLM down"),
      el("td", {class: "num"}, c.priority), el("td", {class: "num"}, c.in_flight),
      el("td", {class: "num"}, c.capacity), el("td", {}, ago(c.connected_since))))));
  document.getElementById("aliases").replaceChildren(...Object.entries(doc.aliases).map(([a, chain]) =>
    el("tr", {}, el("td", {}, a), el("td", {}, chain.join(" → ")))));
  document.body.dataset.ready = "1";
}

refresh();
setInterval(refresh, 5000);
