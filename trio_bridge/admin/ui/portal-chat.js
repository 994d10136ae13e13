// The portal's chat page: streams a chat completion through the bridge (server-sent events);
// Stop aborts the request, the broker resets the stream, and the LLM stops generating.
"use strict";
const box = document.getElementById("chat");
const conf = JSON.parse(box.dataset.conf);
const keyInput = document.getElementById("chat-key");
const log = document.getElementById("chat-log");
const input = document.getElementById("chat-input");
const send = document.getElementById("chat-send");
const stop = document.getElementById("chat-stop");
const history = [];
let controller = null;
keyInput.value = sessionStorage.getItem("tb_portal_key") || "";
keyInput.addEventListener("change", () => sessionStorage.setItem("tb_portal_key", keyInput.value));

// The log scrolls inside a box of fixed height; it follows the end of the conversation unless
// the reader scrolled up to read.
function atEnd() { return log.scrollHeight - log.scrollTop - log.clientHeight < 24; }
function show(update) {
  const follow = atEnd();
  update();
  if (follow) log.scrollTop = log.scrollHeight;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  show(() => log.appendChild(div));
  return div;
}

stop.addEventListener("click", () => { if (controller) controller.abort(); });

document.getElementById("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  controller = new AbortController();
  send.disabled = true; stop.disabled = false;
  let answer = "";
  try {
    const r = await fetch(conf.url, {
      method: "POST", signal: controller.signal,
      headers: { "content-type": "application/json", "authorization": "Bearer " + keyInput.value },
      body: JSON.stringify({ model: conf.model, stream: true, messages: history }),
    });
    if (!r.ok) {
      let msg = r.status + "";
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      show(() => { out.textContent = "Error: " + msg; out.classList.add("error"); });
      return;
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line.startsWith("data:") || line === "data: [DONE]") continue;
        try {
          const delta = JSON.parse(line.slice(5)).choices[0].delta.content || "";
          answer += delta;
          show(() => { out.textContent = answer; });
        } catch (e) { /* a keep-alive or a partial line */ }
      }
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    const note = document.createElement("div");
    note.className = "stopped";
    note.id = "chat-stopped";
    note.textContent = e.name === "AbortError" ? "Stopped." : "Failed: " + e.message;
    show(() => log.appendChild(note));
    if (answer) history.push({ role: "assistant", content: answer });
  } finally {
    controller = null;
    send.disabled = false; stop.disabled = true;
  }
});
