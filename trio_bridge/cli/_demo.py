"""``demo``: broker + connector (+ the test model) in one process on loopback."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import tempfile
from pathlib import Path

import attrs
import trio

from trio_bridge._config import Config
from trio_bridge._errors import listening
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.broker._broker import Broker
from trio_bridge.cli._check import first_model
from trio_bridge.cli._testmodel import MODEL_ID, TestModel
from trio_bridge.connector._connector import Connector

log = logging.getLogger("trio_bridge.cli")

#: the demo's public port (llama.cpp and Open WebUI use 8080, vLLM 8000, Ollama 11434)
DEMO_PORT = 8421


class Demo:
    """Broker + connector (+ the test model when no LLM answers) in one process on loopback.
    Ctrl-C drains like the roles do: in-flight answers finish, then everything stops."""

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.broker: Broker | None = None
        self.connector: Connector | None = None
        self._done = trio.Event()

    def last_words(self) -> None:
        if self.connector is not None:
            self.connector.last_words()

    async def drain(self) -> None:
        """What a standalone broker and connector do on their first signal, together: the
        broker refuses new requests at once (503 + ``Retry-After``, ``/readyz`` 503), the
        connector tells it it is going (GOAWAY), answers in flight finish for up to
        ``shutdown_grace``; then the demo stops."""
        grace = float(self.config.limits.shutdown_grace)
        async with trio.open_nursery() as nursery:
            if self.broker is not None:
                nursery.start_soon(self.broker.drain, grace)
            if self.connector is not None:
                nursery.start_soon(self.connector.drain, grace)
        self._done.set()

    async def run(self) -> None:
        config, args = self.config, self.args
        local_url = args.local_url or config.connector.local_url
        model_id = None if args.test_model else await first_model(local_url)
        with tempfile.TemporaryDirectory(prefix="trio-bridge-demo-") as tmp:
            async with trio.open_nursery() as nursery:
                if model_id is None:
                    model = TestModel(token_delay=0.05)
                    host, port = await nursery.start(model.serve)
                    local_url, model_id = f"http://{host}:{port}", MODEL_ID
                    label = (
                        f"built-in TEST MODEL (not a real LLM; no LLM answered at "
                        f"{args.local_url or config.connector.local_url})"
                    )
                else:
                    label = f"the LLM at {local_url}"
                config = attrs.evolve(
                    config,
                    base_dir=tmp,
                    broker=attrs.evolve(
                        config.broker,
                        listen=f"127.0.0.1:{args.port}",
                        admin_listen="127.0.0.1:0",
                        connector_tokens_file="tokens.toml",
                    ),
                )
                tokens = SecretStore(Path(tmp) / "tokens.toml", "tbc")
                _, token = tokens.add("demo-connector")
                keys = SecretStore(Path(tmp) / "keys.toml", "tbk")
                _, api_key = keys.add("demo-user")
                self.broker = broker = Broker(config, tokens)
                with listening("--port", f"127.0.0.1:{args.port}"):
                    bhost, bport = await nursery.start(broker.serve)
                config = attrs.evolve(
                    config,
                    connector=attrs.evolve(
                        config.connector,
                        broker_urls=[f"ws://{bhost}:{bport}{config.broker.relay_path}"],
                        local_url=local_url,
                        name="demo-connector",
                        admin_listen="127.0.0.1:0",
                        api_keys_file="keys.toml",
                    ),
                )
                self.connector = connector = Connector(config, keys=keys, token=token)
                nursery.start_soon(connector.run)
                with trio.fail_after(10):
                    await connector.connected.wait()
                admins = [broker.admin_address, connector.admin_address]
                _print_demo(f"http://{bhost}:{bport}", api_key, model_id, label, admins)
                await self._done.wait()
                nursery.cancel_scope.cancel()


def _print_demo(
    base: str, key: str, model: str, label: str, admins: list[tuple[str, int] | None]
) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
    stream_body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "count to 20"}]}
    )
    py = (
        f"from openai import OpenAI; c = OpenAI(base_url='{base}/v1', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', "
        f"'content': 'Say hello'}}]).choices[0].message.content)"
    )
    if importlib.util.find_spec("openai") is not None:
        sdk = f'  {sys.executable} -c "{py}"'
    else:
        sdk = f'  # with the openai SDK (pip install openai):\n  python3 -c "{py}"'
    hdrs = f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json'"
    # the same program the user started, so the line works as printed
    me = (
        "trio-bridge"
        if Path(sys.argv[0]).name == "trio-bridge"
        else f"{sys.executable} -m trio_bridge"
    )
    admin_lines = "\n".join(
        f"  {me} status --url http://{a[0]}:{a[1]}     # {role}: state, latency, errors"
        f"\n  curl -s http://{a[0]}:{a[1]}/metrics | grep ^trio_bridge_requests"
        for role, a in zip(("broker", "connector"), admins, strict=True)
        if a is not None
    )
    # the admin ports are chosen at random (two demos, or a demo beside real roles, must not
    # collide): name the pages here, the one place that knows them
    broker_admin, connector_admin = admins
    pages = ""
    if connector_admin is not None:
        pages += (
            f"  Inspector (connector) : http://{connector_admin[0]}:{connector_admin[1]}/"
            "   requests live, usage, LLM and relay timeline\n"
        )
    if broker_admin is not None:
        pages += (
            f"  Broker page           : http://{broker_admin[0]}:{broker_admin[1]}/"
            "   routes, connectors, requests and errors over time\n"
        )
    print(
        f"""
trio-bridge demo is running: broker + connector on loopback, serving {label}.

  Public base URL : {base}/v1
  API key         : {key}
  Model           : {model}

Try it (paste into another terminal):

  curl -sS {base}/v1/chat/completions {hdrs} -d '{body}'

  curl -sSN {base}/v1/chat/completions {hdrs} -d '{stream_body}'

{sdk}

Open in a browser:
{pages}
Health and metrics:
{admin_lines}

Press Ctrl-C to stop (in-flight answers finish first; twice to stop at once).
""",
        flush=True,
    )
