// The connector's admin page: the self-service portal's users (approve, block) and its audit
// log (shown only when [portal] is enabled).
"use strict";

async function userAction(action, id) {
  const r = await fetch(`/api/users/${action}/${id}`, {
    method: "POST", credentials: "same-origin", headers: {"X-Trio-Bridge-Admin": "1"},
  });
  if (!r.ok) alert((await r.json()).error || `HTTP ${r.status}`);
  await loadUsers();
}

function actionButton(label, action, id) {
  const b = el("button", {type: "button", class: "user-" + action}, label);
  b.addEventListener("click", () => userAction(action, id));
  return b;
}

async function loadUsers() {
  const doc = await getJSON("/api/users");
  const box = document.getElementById("portal-users");
  box.hidden = !doc.enabled;
  if (!doc.enabled) return;
  document.querySelector("#users tbody").replaceChildren(...doc.users.map(u => {
    const limits = Object.entries(u.limits).map(([k, v]) => `${k}=${v}`).join(", ") || "[defaults]";
    const buttons = el("td", {});
    if (u.state !== "active") buttons.append(actionButton("Approve", "approve", u.id));
    if (u.state !== "blocked") buttons.append(actionButton("Block", "block", u.id));
    return el("tr", {"data-email": u.email},
      el("td", {}, u.email), el("td", {class: "state-" + u.state}, u.state),
      el("td", {}, u.key || "–"), el("td", {}, clock(u.last_login)), el("td", {}, limits), buttons);
  }));
  document.querySelector("#audit tbody").replaceChildren(...doc.audit.map(e => el("tr", {},
    el("td", {}, new Date(e.time * 1000).toLocaleString()), el("td", {}, e.event),
    el("td", {}, e.email), el("td", {}, e.actor), el("td", {}, e.detail))));
}

loadUsers().catch(() => {});
setInterval(() => loadUsers().catch(() => {}), 5000);
