"""The pytest plugin (entry point ``pytest11``): the ``bridge`` and ``test_model`` fixtures.

Kept apart from :mod:`trio_bridge.testing` so that the lab (``open_bridge``, ``open_lab``,
``MemoryNetwork``) can be used without pytest installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from trio_bridge.testing import Bridge, RunningModel, open_bridge, run_test_model

_OUR_FIXTURES = frozenset({"bridge", "test_model"})


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A clear error, instead of pytest's generic one about async fixtures, when a test uses
    our fixtures without pytest-trio running it."""
    if not _OUR_FIXTURES & set(getattr(item, "fixturenames", ())):
        return
    if not item.config.pluginmanager.has_plugin("trio"):
        raise pytest.UsageError(
            "trio_bridge.testing: the `bridge` and `test_model` fixtures need pytest-trio "
            "(pip install pytest-trio, then set `trio_mode = true` under [pytest] in "
            "pytest.ini, or mark the test with @pytest.mark.trio)"
        )
    if item.get_closest_marker("trio") is None:
        raise pytest.UsageError(
            f"trio_bridge.testing: {item.name} uses `bridge`/`test_model` but does not run "
            "under trio: set `trio_mode = true` under [pytest] in pytest.ini, or mark it "
            "with @pytest.mark.trio (and make it `async def`)"
        )


@pytest.fixture
async def test_model() -> AsyncIterator[RunningModel]:
    """The built-in OpenAI-compatible test model on 127.0.0.1 (a free port): ``.url``,
    ``.model``. Deterministic: echoes the last user message; "count to N" → ``1 2 … N``."""
    async with run_test_model() as running:
        yield running


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    """A broker and a connector in this test's event loop, in front of the test model:
    ``.openai_base_url`` and ``.api_key`` for your client, ``.restart_broker()`` /
    ``.restart_connector()`` to test reconnects, ``.broker`` / ``.connector`` for their state.
    Use an async client (``openai.AsyncOpenAI``): a sync one blocks the loop the bridge runs
    in."""
    async with open_bridge() as b:
        yield b
