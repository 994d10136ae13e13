// The broker's overview: requests and errors per route over the last minutes, routes with
// their recent figures, connectors, aliases.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function pct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + " %"; }

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

// One strip per route: a bar per step for its requests, its errors over it (attributes only:
// the page's Content-Security-Policy allows no inline style).
function seriesChart(name, s) {
  const n = s.requests.length, w = 600, h = 60, bw = w / n;
  const max = Math.max(1, ...s.requests);
  const chart = svg("svg", {viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", class: "series",
                            role: "img", "aria-label": `requests and errors of route ${name}`});
  s.requests.forEach((req, i) => {
    const err = s.errors[i], x = i * bw;
    const at = new Date((s.end - (n - i) * s.step_s) * 1000).toLocaleTimeString([], {hour12: false});
    const title = svg("title", {});
    title.textContent = `${at}: ${req} requests, ${err} errors`;
    const slot = svg("g", {"data-step": i});
    slot.append(title, svg("rect", {x, y: 0, width: bw, height: h, class: "slot"}));
    if (req) slot.append(svg("rect", {x: x + 0.5, y: h - (req / max) * h, width: Math.max(bw - 1, 1),
                                      height: (req / max) * h, class: "requests"}));
    if (err) slot.append(svg("rect", {x: x + 0.5, y: h - (err / max) * h, width: Math.max(bw - 1, 1),
                                      height: (err / max) * h, class: "errors"}));
    chart.append(slot);
  });
  const total = s.requests.reduce((a, b) => a + b, 0), errors = s.errors.reduce((a, b) => a + b, 0);
  const peak = Math.max(...s.requests);
  return el("div", {class: "series-row", "data-route": name},
    el("div", {class: "series-name"}, el("strong", {}, name),
       el("div", {class: "note"}, `${total} requests, `,
          el("span", {class: errors ? "outcome-bad" : ""}, `${errors} errors`),
          ` · peak ${peak} per ${s.step_s} s`)),
    el("div", {}, chart, el("div", {class: "axis note"}, el("span", {}, `${Math.round(n * s.step_s / 60)} min ago`),
                             el("span", {}, "now"))));
}

// ready / LLM down / draining, and "ejected" while its recent answers failed (no new request
// goes to it for a while: passive health)
function connectorState(c) {
  const text = c.draining ? "draining" : !c.ready ? "LLM down"
    : c.ejected_for_s > 0 ? `ejected (${Math.ceil(c.ejected_for_s)} s more): its last answers failed` : "ready";
  return el("td", {class: text === "ready" ? "outcome-ok" : "outcome-bad", "data-state": ""}, text);
}

async function refresh() {
  const doc = await getJSON("/api/routes");
  document.getElementById("badges").replaceChildren(
    badge(doc.draining ? "draining" : "serving", !doc.draining),
    badge(`in flight ${doc.in_flight}`), badge(`queued ${doc.queued}`));
  const routes = Object.entries(doc.routes);
  const charted = routes.filter(([, r]) => r.series);
  document.getElementById("series").replaceChildren(...(charted.length
    ? charted.map(([name, r]) => seriesChart(name, r.series))
    : [el("div", {class: "note"}, "no requests yet: each route appears here with its first request")]));
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
      connectorState(c),
      el("td", {class: "num"}, c.priority), el("td", {class: "num"}, c.in_flight),
      el("td", {class: "num"}, c.capacity),
      el("td", {class: c.failed ? "num outcome-bad" : "num"}, `${c.answers} / ${c.failed}`),
      el("td", {}, ago(c.connected_since))))));
  document.getElementById("problems").replaceChildren(...(doc.problems || []).map(p =>
    el("li", {class: "outcome-bad"}, p)));
  const aliases = Object.entries(doc.aliases);
  document.getElementById("aliases").replaceChildren(...(aliases.length
    ? aliases.map(([a, chain]) => el("tr", {}, el("td", {}, a), el("td", {}, chain.join(" → "))))
    : [el("tr", {}, el("td", {class: "note", colSpan: 2},
        "No aliases: a request goes to a connector that serves the model it names. An alias " +
        "gives a model another name or a fallback chain: [broker] aliases = " +
        "{ coder = [\"qwen2.5-coder:32b\", \"qwen2.5-coder:7b\"] } in the broker's config."))]));
  document.body.dataset.ready = "1";
}

refresh();
setInterval(refresh, 5000);
