"""The container image's contract, tested without a Docker engine (none runs on these
machines): the Dockerfile's ENTRYPOINT + CMD start a role from the mounted bridge.toml as a
non-root user, and its HEALTHCHECK command turns healthy exactly when the role is ready."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio
from netutil import free_port

from trio_bridge._config import load_config
from trio_bridge.testing import Lab, open_lab

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instruction(name: str) -> str:
    """The (last) value of a Dockerfile instruction, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(.*)$", text, re.M)
    assert found, name
    return str(found[-1]).strip()


def exec_form(value: str) -> list[str]:
    args = json.loads(value)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    return args


def in_venv(args: list[str]) -> list[str]:
    """``trio-bridge …`` as the image runs it, with this environment's interpreter."""
    assert args[0] == "trio-bridge"
    return [sys.executable, "-m", "trio_bridge", *args[1:]]


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


def test_the_image_runs_as_a_non_root_user_with_a_config_volume() -> None:
    user = instruction("USER")
    assert user not in ("root", "0") and re.search(rf"useradd .*{user}", DOCKERFILE)
    assert "/etc/trio-bridge" in instruction("VOLUME")
    assert instruction("STOPSIGNAL") == "SIGTERM"  # the roles drain on it
    assert "/readyz" in (ROOT / "trio_bridge" / "admin" / "_admin.py").read_text()


async def test_entrypoint_and_healthcheck_work_as_the_image_runs_them(
    lab: Lab, tmp_path: Path
) -> None:
    entry = exec_form(instruction("ENTRYPOINT"))
    cmd = exec_form(instruction("CMD"))
    health = instruction("HEALTHCHECK")
    health_cmd = exec_form(health.split("CMD", 1)[1].strip())
    config_path = cmd[cmd.index("-c") + 1]
    assert health_cmd[health_cmd.index("-c") + 1] == config_path

    rb = await lab.start_broker()
    model = await lab.start_test_model()
    etc = tmp_path / "etc-trio-bridge"  # what the volume holds
    etc.mkdir()
    (etc / "bridge.toml").write_text(
        f'[connector]\nbroker_urls = ["{rb.relay_url}"]\nlocal_url = "{model.url}"\n'
        'admin_listen = "127.0.0.1:0"\n'
    )
    # the health check reads admin_listen from the same file: give it a fixed free port
    admin_port = free_port()
    text = (etc / "bridge.toml").read_text().replace("127.0.0.1:0", f"127.0.0.1:{admin_port}")
    (etc / "bridge.toml").write_text(text)
    token = etc / "connector.token"
    token.write_text(lab.token)
    os.chmod(token, 0o600)
    lab.keys.add("container-user")
    (etc / "keys.toml").write_bytes((lab.dir / "keys.toml").read_bytes())
    os.chmod(etc / "keys.toml", 0o600)

    def local(args: list[str]) -> list[str]:
        return [str(etc / "bridge.toml") if a == config_path else a for a in in_venv(args)]

    async def healthy() -> bool:
        r = await trio.run_process(local(health_cmd), capture_stdout=True, capture_stderr=True,
                                   check=False)  # fmt: skip
        return r.returncode == 0

    assert not await healthy()  # nothing runs yet
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            partial(trio.run_process, local([*entry, *cmd]), check=False, cwd=str(etc))
        )
        with trio.fail_after(30):
            while not await healthy():
                await trio.sleep(0.2)
        assert rb.broker.registry.relays()  # the container's connector is serving
        proc.send_signal(15)  # docker stop
        with trio.fail_after(20):
            await proc.wait()
        assert proc.returncode == 0
    assert not await healthy()


def test_compose_examples_use_the_image_commands() -> None:
    for name in ("compose.connector.yaml", "compose.broker.yaml"):
        text = (ROOT / "conf" / "docker" / name).read_text()
        assert "build: ../.." in text
        for command in re.findall(r"command: (\[.*\])", text):
            args = json.loads(command)
            role_config = ROOT / "conf" / "docker" / f"{args[0]}.bridge.toml"
            assert args[1:] == ["-c", "/etc/trio-bridge/bridge.toml"], name
            # the example config is valid for that role (loaded, not run: it names a real host)
            assert load_config(role_config).sections == (args[0],)


def test_every_file_the_readme_and_the_docs_name_exists() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing: list[str] = []
    for page in pages:
        text = page.read_text()
        links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)  # relative Markdown links
        named = re.findall(
            r"`((?:conf|tests|bench|packaging|trio_bridge|docs|\.ci)/[\w./-]+?)`", text
        )  # paths in backticks, from the top of the repository
        missing += [f"{page.name}: {p}" for p in links if not (page.parent / p).exists()]
        missing += [f"{page.name}: {p}" for p in named if not (ROOT / p).exists()]
    assert not missing, f"files named that are not in the repository: {missing}"


def test_every_docs_page_is_installed_beside_the_readme() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = project["tool"]["setuptools"]["data-files"]["share/doc/trio-bridge/docs"]
    assert sorted(installed) == sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))


def test_the_readme_links_every_docs_page_and_mkdocs_lists_them() -> None:
    readme = (ROOT / "README.md").read_text()
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme or page.name == "index.md", page.name
        assert f": {page.name}" in mkdocs, page.name


def test_the_grafana_dashboard_queries_metrics_the_bridge_exports() -> None:
    from trio_bridge._observe import Metrics

    dash = json.loads((ROOT / "conf" / "grafana-dashboard.json").read_text())
    assert dash["__inputs"][0]["pluginId"] == "prometheus" and dash["panels"]
    exported: set[str] = set()
    for role in ("broker", "connector"):
        for metric in Metrics(role).registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
            exported.update(metric.name + x for x in suffixes.get(metric.type, [""]))
    for p in dash["panels"]:
        for target in p["targets"]:
            names = set(re.findall(r"\b(trio_bridge_\w+)", target["expr"]))
            assert names and names <= exported, (p["title"], names - exported)


@pytest.mark.parametrize(("pure", "expected"), [("", "h11_mypyc"), ("1", "h11")])
async def test_the_hot_http_paths_use_compiled_h11_unless_told_not_to(
    pure: str, expected: str
) -> None:
    env = {**os.environ, "TRIO_BRIDGE_PURE_H11": pure}
    code = (
        "from trio_bridge.http import _server, _upstream\n"
        "print(_server.h11.__name__, _upstream.h11.__name__)"
    )
    proc = await trio.run_process(
        [sys.executable, "-c", code], env=env, capture_stdout=True, check=True
    )
    assert proc.stdout.decode().split() == [expected, expected]
