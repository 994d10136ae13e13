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


USES_BRIDGE = """
async def test_uses_bridge(bridge):
    assert bridge.api_key
"""


def test_fixtures_are_documented_in_pytest_fixtures(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures")  # the plugin comes by entry point
    out = result.stdout.str()
    assert "bridge -- " in out or "bridge [" in out, out[-2000:]
    assert "A broker and a connector in this test's event loop" in out
    assert "The built-in OpenAI-compatible test model" in out


def test_without_pytest_trio_the_error_says_what_to_install(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_BRIDGE)
    result = pytester.runpytest_subprocess("-p", "no:trio")
    assert "need pytest-trio" in result.stdout.str() + result.stderr.str()
    assert result.ret != 0


def test_without_trio_mode_the_error_says_how_to_enable_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_BRIDGE)
    result = pytester.runpytest_subprocess()  # pytest-trio installed, trio_mode not set
    assert "does not run under trio" in result.stdout.str() + result.stderr.str()
    assert result.ret != 0


def test_the_documented_example_runs_as_written(pytester: pytest.Pytester) -> None:
    """The example of docs/testing.md, verbatim, in a project of its own."""
    import re
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    section = page.split("# Testing your client against the bridge", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_my_client=code.group(1))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=len(re.findall(r"^async def test_", code.group(1), re.M)))


def test_the_lab_is_usable_without_pytest() -> None:
    """`trio_bridge.testing` (open_bridge, open_lab, MemoryNetwork) imports without pytest: the
    fixtures live in the plugin module pytest loads by its entry point."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pytest'] = None\n"  # any `import pytest` now fails
        "from trio_bridge.testing import MemoryNetwork, open_bridge, open_lab\n"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
