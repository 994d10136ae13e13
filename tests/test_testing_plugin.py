"""The pytest plugin integrators use: registered by entry point, fixtures work, handles work."""

from __future__ import annotations

import httpx
import openai
import pytest

from trio_bridge.testing import Bridge, RunningModel


def test_plugin_is_registered_through_the_entry_point(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.get_plugin("trio_bridge") is not None


async def test_test_model_fixture_serves_openai_chat(test_model: RunningModel) -> None:
    client = openai.AsyncOpenAI(base_url=test_model.url + "/v1", api_key="unused")
    r = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count to 3"}]
    )
    assert r.choices[0].message.content == "1 2 3"


async def test_bridge_fixture_with_admin_urls_and_restart_handles(bridge: Bridge) -> None:
    client = openai.AsyncOpenAI(
        base_url=bridge.openai_base_url, api_key=bridge.api_key, max_retries=3
    )
    async with httpx.AsyncClient() as http:
        assert (await http.get(bridge.broker_admin_url + "/readyz")).status_code == 200
        assert (await http.get(bridge.connector_admin_url + "/readyz")).status_code == 200
    await bridge.restart_broker(down_for=0.2)
    r = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count to 2"}]
    )
    assert r.choices[0].message.content == "1 2"
    await bridge.restart_connector()
    r = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "count to 4"}]
    )
    assert r.choices[0].message.content == "1 2 3 4"
