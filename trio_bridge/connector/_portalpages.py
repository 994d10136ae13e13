"""The portal's HTML: small server-made pages (every value escaped), no inline script or style
(the CSP forbids both), the portal's CSS and script from ``trio_bridge/admin/ui/``."""

from __future__ import annotations

import datetime as dt
import json
import mimetypes
from collections.abc import Iterable
from html import escape
from importlib import resources
from typing import TYPE_CHECKING, Any

from trio_bridge.accounts._keys import SecretEntry
from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._users import ACTIVE, PENDING, User

if TYPE_CHECKING:
    from trio_bridge.connector._portal import Answer

_STATIC = frozenset({"portal.css", "portal.js", "portal-chat.js"})


def static(name: str) -> Answer:
    from trio_bridge.connector._portal import Answer

    if name not in _STATIC:
        return Answer(404, message("Not found", "No such file.", "").encode())
    data = resources.files("trio_bridge.admin").joinpath("ui", name).read_bytes()
    ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Answer(200, data, content_type=f"{ctype}; charset=utf-8".encode())


def _layout(title: str, body: str, base: str, *, script: str = "") -> str:
    s = f'<script src="{escape(base)}ui/{script}" defer></script>' if script else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{escape(title)}</title><link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{escape(base)}ui/portal.css">{s}</head>'
        f'<body><header><a class="brand" href="{escape(base)}">trio-bridge</a>'
        f"<span>{escape(title)}</span></header><main>{body}</main></body></html>"
    )


def message(title: str, text: str, base: str) -> str:
    link = f'<p><a href="{escape(base)}">Back to the portal</a></p>' if base else ""
    return _layout(
        title,
        f'<section class="message"><h1>{escape(title)}</h1><p>{escape(text)}</p>{link}</section>',
        base or "./",
    )


def signin(base: str, *, expired: bool = False) -> str:
    note = (
        '<p class="note" id="expired">Your session expired: sign in again.</p>' if expired else ""
    )
    return _layout(
        "Sign in",
        f'<section class="message"><h1>Get an API key</h1>{note}'
        "<p>Sign in with your organisation's account to get your key for this LLM, see your "
        "limits and usage, and try the model.</p>"
        f'<p><a class="button" id="signin" href="{escape(base)}login">Sign in</a></p></section>',
        base,
    )


def _form(base: str, path: str, csrf: str, label: str, action: str = "", cls: str = "") -> str:
    act = f'<input type="hidden" name="action" value="{escape(action)}">' if action else ""
    return (
        f'<form method="post" action="{escape(base)}{path}" class="inline">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">{act}'
        f'<button type="submit" id="{escape(action or path)}" class="{cls}">{escape(label)}'
        "</button></form>"
    )


def _num(value: Any) -> str:
    return "no limit" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _chart(by_day: Iterable[dict[str, Any]], today: str) -> str:
    """Tokens per day over the last 30 days, as SVG bars (attributes, not styles: the CSP
    allows them), one slot per day, today on the right."""
    tokens: dict[str, int] = {}
    for r in by_day:
        tokens[r["day"]] = tokens.get(r["day"], 0) + r["prompt_tokens"] + r["completion_tokens"]
    if not tokens:
        return '<p class="note">No usage in the last 30 days.</p>'
    last = dt.date.fromisoformat(today)
    days = [(last - dt.timedelta(days=29 - i)).isoformat() for i in range(30)]
    top = max(tokens.values()) or 1
    w = 20
    bars = []
    for i, day in enumerate(days):
        n = tokens.get(day, 0)
        h = round(100 * n / top) if n else 0
        bars.append(
            f'<rect x="{i * w + 2}" y="{100 - h}" width="{w - 4}" height="{max(h, 1)}" '
            f'class="{"bar" if n else "bar none"}"><title>{escape(day)}: {n:,} tokens</title>'
            "</rect>"
        )
    labels = (
        f'<text x="0" y="114" class="axis">{escape(days[0][5:])}</text>'
        f'<text x="{30 * w}" y="114" class="axis end">{escape(days[-1][5:])} (today)</text>'
        f'<text x="0" y="10" class="axis">{top:,} tokens</text>'
    )
    return (
        f'<svg class="chart" viewBox="0 0 {30 * w} 118" role="img" '
        f'aria-label="tokens per day, last 30 days">{"".join(bars)}{labels}</svg>'
    )


def snippets(public_url: str, model: str, key: str | None) -> str:
    v1 = public_url + "v1"
    k = key or "YOUR_KEY"
    curl = (
        f"curl {v1}/chat/completions \\\n  -H 'Authorization: Bearer {k}' \\\n"
        f"  -H 'Content-Type: application/json' \\\n"
        f'  -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}]}}\''
    )
    sdk = (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{v1}", api_key="{k}")\n'
        f'r = client.chat.completions.create(model="{model}",\n'
        '    messages=[{"role": "user", "content": "Hi"}])\nprint(r.choices[0].message.content)'
    )
    cline = (
        "API Provider: OpenAI Compatible\n"
        f"Base URL:     {v1}\nAPI Key:      {k}\nModel ID:     {model}"
    )
    cont = (
        "# ~/.continue/config.yaml\nmodels:\n  - name: trio-bridge\n    provider: openai\n"
        f"    model: {model}\n    apiBase: {v1}\n    apiKey: {k}"
    )
    out = ['<section id="snippets"><h2>Connect your tools</h2>']
    for ident, title, text in (
        ("curl", "curl", curl),
        ("sdk", "openai SDK (Python)", sdk),
        ("cline", "Cline (VS Code)", cline),
        ("continue", "Continue", cont),
    ):
        out.append(
            f'<h3>{escape(title)}</h3><pre id="snippet-{ident}"><code>{escape(text)}</code></pre>'
            f'<button type="button" class="copy" data-copy="snippet-{ident}">Copy</button>'
        )
    out.append("</section>")
    return "".join(out)


def user_page(
    *,
    base: str,
    public_url: str,
    model: str,
    user: User,
    csrf: str,
    entry: SecretEntry | None,
    secret: str | None,
    limits: KeyLimits,
    left: dict[str, int | None] | None,
    today: dict[str, int],
    month: dict[str, int],
    by_day: list[dict[str, Any]],
    day: str,
    stored: bool,
) -> str:
    parts = [
        f'<section><h1>{escape(user.name or user.email)}</h1><p class="note">{escape(user.email)}'
        f" · {escape(user.state)}</p>{_form(base, 'logout', csrf, 'Sign out')}</section>"
    ]
    if user.state == PENDING:
        parts.append(
            '<section id="pending"><h2>Waiting for approval</h2><p>The operator has been told '
            "you signed in; once they approve you, come back here to make your key.</p></section>"
        )
    elif user.state == ACTIVE:
        key = ['<section id="key"><h2>Your API key</h2>']
        if secret is not None:
            key.append(
                '<div class="secret"><p><strong>Copy your key now: it is shown only once.</strong>'
                f'</p><pre id="secret"><code>{escape(secret)}</code></pre>'
                '<button type="button" class="copy" data-copy="secret">Copy</button></div>'
            )
        if entry is None:
            key.append("<p>You have no key.</p>")
            key.append(_form(base, "key", csrf, "Create my key", "create"))
        else:
            expires = f" · expires {escape(entry.expires)}" if entry.expires else ""
            key.append(
                f'<p>Key <code id="key-id">{escape(entry.id)}</code> made '
                f"{escape(entry.created)}{expires}</p>"
            )
            key.append(_form(base, "key", csrf, "Rotate (new key, old one stops)", "rotate"))
            key.append(_form(base, "key", csrf, "Revoke", "revoke", "danger"))
        key.append("</section>")
        parts.append("".join(key))
        rows = [
            ("Requests at once", limits.concurrency, "concurrency_left"),
            ("Requests per minute", limits.rpm, "requests_left_this_minute"),
            ("Tokens per minute", limits.tokens_per_minute, "tokens_left_this_minute"),
            ("Tokens per day", limits.tokens_per_day, "tokens_left_today"),
        ]
        trs = "".join(
            f"<tr><td>{escape(label)}</td><td class=num>{_num(limit)}</td>"
            f"<td class=num>{_num(left.get(k)) if left else '–'}</td></tr>"
            for label, limit, k in rows
        )
        models = ", ".join(limits.models) or "any"
        parts.append(
            f'<section id="limits"><h2>Limits</h2><table><tr><th></th><th class=num>limit</th>'
            f"<th class=num>left now</th></tr>{trs}</table>"
            f'<p class="note">Models: {escape(models)}</p></section>'
        )
        use = "".join(
            f"<tr><td>{escape(label)}</td><td class=num>{t['requests']:,}</td>"
            f"<td class=num>{t['prompt_tokens'] + t['completion_tokens']:,}</td>"
            f"<td class=num>{t['errors'] + t['refused']:,}</td></tr>"
            for label, t in (("Today", today), ("Last 30 days", month))
        )
        note = "" if stored else '<p class="note">Usage is not stored on this connector.</p>'
        parts.append(
            f'<section id="usage"><h2>Usage</h2><table><tr><th></th><th class=num>requests</th>'
            f"<th class=num>tokens</th><th class=num>errors</th></tr>{use}</table>"
            f"{_chart(by_day, day)}{note}</section>"
        )
        parts.append(snippets(public_url, model, secret))
        parts.append(
            f'<section><h2>Try it</h2><p><a class="button" id="chat-link" href="{escape(base)}'
            'chat">Chat with the model</a></p></section>'
        )
    return _layout("Your access", "".join(parts), base, script="portal.js")


def chat(base: str, public_url: str, model: str) -> str:
    conf = escape(json.dumps({"url": public_url + "v1/chat/completions", "model": model}))
    return _layout(
        "Chat",
        f'<section id="chat" data-conf="{conf}"><h1>Chat</h1>'
        '<p class="note">Your key stays in this browser tab only (it is sent to the API, like '
        "any client would).</p>"
        '<label>API key <input type="password" id="chat-key" autocomplete="off"></label>'
        '<div id="chat-log" aria-live="polite"></div>'
        '<form id="chat-form"><textarea id="chat-input" rows="3" required></textarea>'
        '<button type="submit" id="chat-send">Send</button>'
        '<button type="button" id="chat-stop" disabled>Stop</button></form>'
        f'<p><a href="{escape(base)}">Back</a></p></section>',
        base,
        script="portal-chat.js",
    )
