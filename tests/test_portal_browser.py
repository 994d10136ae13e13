"""The portal's whole flow in headless Chromium (Debian's chromium + chromedriver, driven by
selenium; skipped, saying why, without them or without node): sign in at the real OpenID
provider, make a key, call the API with it from the ``openai`` SDK, see the usage change, chat
and press Stop (the LLM stops), revoke, see the key refused; the operator's page lists the user.
``TB_SHOTS=/some/dir`` keeps a screenshot of each page there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from tests.test_inspector import driver, in_browser, wait_for
from tests.test_portal import Env, _chat, env

__all__ = ["driver", "env"]  # fixtures

pytestmark = pytest.mark.slow


def shot(d: Any, name: str) -> None:
    where = os.environ.get("TB_SHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(Path(where) / f"{name}.png"))


async def test_sign_in_get_a_key_use_it_chat_stop_and_revoke_in_a_browser(
    env: Env, driver: Any
) -> None:
    from selenium.webdriver.common.by import By

    conn = await env.start()
    model = env.model.model
    d = driver

    def sign_in() -> None:
        d.delete_all_cookies()
        d.get(env.base)
        shot(d, "1-sign-in")
        wait_for(d, "#signin").click()
        wait_for(d, "input[name=login]", 10).send_keys("alice")
        d.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys("anything")
        shot(d, "2-provider-login")
        d.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for(d, "#create", 10)
        shot(d, "3-user-page")

    await in_browser(sign_in)

    def create_key() -> str:
        d.find_element(By.CSS_SELECTOR, "#create").click()
        secret = wait_for(d, "#secret", 10)
        shot(d, "4-key-shown-once")
        return str(secret.text.strip())

    key = await in_browser(create_key)
    assert key.startswith("tbk_")
    assert await _chat(env, key)  # the openai SDK, with the key from the page

    def usage_today() -> str:
        d.get(env.base)
        row = wait_for(d, "#usage tr:nth-child(2)", 5)
        return str(row.text)

    with trio.fail_after(5):
        while not (await in_browser(usage_today)).startswith("Today 1 "):
            await trio.sleep(0.1)

    def usage_shot() -> None:  # the whole page: usage, chart, snippets
        d.set_window_size(1500, 2400)
        shot(d, "5-usage-and-snippets")
        d.set_window_size(1500, 1000)

    await in_browser(usage_shot)

    completed, disconnects = model.completed_streams, model.disconnects

    def chat_and_stop() -> None:
        wait_for(d, "#chat-link").click()
        box = wait_for(d, "#chat-input", 10)
        assert d.find_element(By.CSS_SELECTOR, "#chat-key").get_attribute("value") == key
        box.send_keys("count to 20000")
        d.find_element(By.CSS_SELECTOR, "#chat-send").click()
        wait_for(d, "#chat-log .assistant", 10, text="1 2 3 4 5")
        stop = d.find_element(By.CSS_SELECTOR, "#chat-stop")
        at = stop.location["y"]
        answer = wait_for(d, "#chat-log .assistant", 10, text=" 300 ")  # many lines by now
        # Stop stays where it was while the answer grows (the log scrolls, the page does not):
        # a button that moves down a line at a time is missed by a user's click (and was by
        # this test's, under load)
        assert stop.location["y"] == at
        assert d.execute_script(  # the log follows the answer: its end is in view
            "const l = arguments[0].parentElement;"
            "return l.scrollHeight - l.scrollTop - l.clientHeight < 40;",
            answer,
        )
        shot(d, "6-chat-streaming")
        stop.click()
        wait_for(d, "#chat-stopped", 5, text="Stopped.")
        shot(d, "7-chat-stopped")

    await in_browser(chat_and_stop)
    with trio.fail_after(5):  # the LLM stopped generating: the stream ended, not completed
        while model.active_streams or model.disconnects == disconnects:
            await trio.sleep(0.02)
    assert model.completed_streams == completed

    host, port = conn.admin_address or ("", 0)

    def admin_page() -> str:
        d.get(f"http://{host}:{port}/")
        row = wait_for(d, "#users tr[data-email='alice@example.com']", 10)
        wait_for(d, "#audit td", 5, text="key_created")
        shot(d, "8-admin-users")
        return str(row.text)

    assert "active" in await in_browser(admin_page)

    def revoke() -> str:
        d.get(env.base)
        wait_for(d, "#revoke").click()
        wait_for(d, "#create", 10)
        shot(d, "9-revoked")
        return str(d.find_element(By.CSS_SELECTOR, "#key").text)

    assert "You have no key" in await in_browser(revoke)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        await _chat(env, key)
