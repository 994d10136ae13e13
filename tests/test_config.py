"""bridge.toml: strict, frozen, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trio_bridge._config import load_config, parse_duration, parse_size
from trio_bridge._errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bridge.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file() -> None:
    c = load_config(None)
    assert c.broker.listen == "0.0.0.0:8080"
    assert c.broker.admin_listen.startswith("127.0.0.1:")
    assert c.limits.max_body == 16 * 1024 * 1024
    assert c.connector.max_concurrent == 10


def test_human_units_and_relative_paths(tmp_path: Path) -> None:
    c = load_config(
        write(
            tmp_path,
            '[broker]\nqueue_timeout = "250ms"\nconnector_tokens_file = "t.toml"\n'
            '[limits]\nmax_body = "1MiB"\nidle_timeout = "2m"\nconnect_timeout = 3\n',
        )
    )
    assert c.broker.queue_timeout == 0.25
    assert c.limits.max_body == 1024 * 1024
    assert c.limits.idle_timeout == 120
    assert c.limits.connect_timeout == 3
    assert c.path(c.broker.connector_tokens_file) == tmp_path / "t.toml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[broker]\nqueue_timeout = "soon"', "broker.queue_timeout: invalid duration 'soon'"),
        ("[broker]\nlisten = 8080", "broker.listen: expected str, got int 8080"),
        ('[connector]\nmax_concurrent = "10"', "connector.max_concurrent: expected int"),
        ("[connector]\nmax_concurrent = true", "connector.max_concurrent: expected int"),
        ("[connector]\nbogus = 1", "unknown key connector.bogus"),
        ("[nope]\nx = 1", "unknown key nope"),
        ('[connector]\nbroker_urls = ["http://x"]', "connector.broker_urls: invalid broker URL"),
        ("[connector]\nbroker_urls = [1]", "connector.broker_urls.0: expected str"),
        ('[log]\nlevel = "loud"', "log.level: invalid level 'loud'"),
        ("[connector]\nmax_concurrent = -1", "connector.max_concurrent: must be positive"),
        ('[limits]\nmax_body = "lots"', "limits.max_body: invalid size"),
        ('[broker]\nlisten = "nowhere"', "broker.listen: invalid address"),
        ("[broker\n", "invalid TOML"),
    ],
)
def test_wrong_keys_and_types_are_one_line_errors_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_config_is_frozen(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, ""))
    with pytest.raises(AttributeError):
        c.broker.listen = "x"  # type: ignore[misc]


def test_parsers() -> None:
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("1h") == 3600
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("1GB") == 10**9
    for bad in ("-1s", "1 fortnight", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_example_configs_in_conf_are_valid() -> None:
    conf = Path(__file__).parent.parent / "conf"
    files = sorted(conf.glob("*.toml"))
    assert len(files) >= 3
    for f in files:
        load_config(f)


# -- the example files in conf/ list every key (they cannot drift from the schema) ----------

CONF = Path(__file__).parent.parent / "conf"
#: the [limits] and [relay] keys each role reads (the rest of a section belongs to one role)
ROLE_KEYS = {
    "broker": {
        "limits": {
            "max_body", "max_header_bytes", "max_headers", "max_uri", "max_requests",
            "keep_alive_timeout", "head_timeout", "min_body_rate", "max_connections",
            "max_connections_per_address", "stall_timeout", "shutdown_grace",
        },
        "relay": {"ping_interval", "window", "max_buffered", "max_streams"},
    },
    "connector": {
        "limits": {
            "max_body", "connect_timeout", "first_byte_timeout", "idle_timeout",
            "stall_timeout", "shutdown_grace",
        },
        "relay": {"ping_interval", "request_window", "max_buffered", "max_streams"},
    },
}  # fmt: skip


def listed_keys(path: Path) -> dict[str, set[str]]:
    """Keys per [section] of an example file, commented-out ones included."""
    import re

    out: dict[str, set[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
            out.setdefault(section, set())
        elif section and (m := re.match(r"^#?\s*(\w+)\s*=", line)):
            out[section].add(m.group(1))
    return out


def fields(cls: type) -> set[str]:
    import attrs

    return {f.name for f in attrs.fields(cls) if not f.metadata.get("internal")}


@pytest.mark.parametrize("role", ["broker", "connector"])
def test_each_example_file_lists_every_key_its_role_reads(role: str) -> None:
    from trio_bridge._config import BrokerConfig, ConnectorConfig, LogConfig

    path = CONF / f"{role}.toml"
    config = load_config(path)  # valid as it is
    assert config.sections == (role,)
    listed = listed_keys(path)
    own = BrokerConfig if role == "broker" else ConnectorConfig
    assert listed[role] == fields(own)
    assert listed["limits"] == ROLE_KEYS[role]["limits"]
    assert listed["relay"] == ROLE_KEYS[role]["relay"]
    assert listed["log"] == fields(LogConfig)
    if role == "connector":
        from trio_bridge._config import InspectorConfig

        assert listed["inspector"] == fields(InspectorConfig)


def test_every_schema_key_is_in_an_example_file() -> None:
    from trio_bridge._config import Config, LimitsConfig, RelayConfig

    assert set(listed_keys(CONF / "broker.toml")) | set(listed_keys(CONF / "connector.toml")) == (
        fields(Config)
    )
    for section, cls in (("limits", LimitsConfig), ("relay", RelayConfig)):
        both = ROLE_KEYS["broker"][section] | ROLE_KEYS["connector"][section]
        assert both == fields(cls), f"[{section}]: a new key must be listed for its role"


def test_the_example_values_are_the_defaults_except_the_addresses() -> None:
    """A key set in conf/ to something else than its default would surprise a reader who
    deletes the line; only the addresses differ on purpose."""
    import attrs

    from trio_bridge._config import Config

    default = Config()
    for role, differs in (("broker", {"listen"}), ("connector", {"broker_urls"})):
        config = load_config(CONF / f"{role}.toml")
        for section in ("broker", "connector", "limits", "relay", "log", "inspector"):
            got, want = (
                attrs.asdict(getattr(config, section)),
                attrs.asdict(getattr(default, section)),
            )
            for key in listed_keys(CONF / f"{role}.toml").get(section, ()):
                if key not in differs:
                    assert got[key] == want[key], f"{role}.toml [{section}] {key}"


def test_a_string_where_a_list_is_expected_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[connector]\nbroker_urls = "ws://h:1/_bridge/relay"\n'))
    assert "connector.broker_urls: expected a list of strings" in str(info.value)
    assert '["ws://h:1/_bridge/relay"]' in str(info.value)


def test_an_unknown_key_suggests_the_known_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key limits.idle_timout \(did you mean "
                       r"limits.idle_timeout\?\)"):  # fmt: skip
        load_config(write(tmp_path, '[limits]\nidle_timout = "1s"\n'))


@pytest.mark.parametrize("key", ["connect_timeout", "first_byte_timeout", "idle_timeout"])
def test_zero_timeouts_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"limits.{key}: must be positive"):
        load_config(write(tmp_path, f'[limits]\n{key} = "0s"\n'))


def test_every_exception_the_package_defines_is_a_bridge_error() -> None:
    import importlib
    import inspect
    import pkgutil

    import trio_bridge
    from trio_bridge._errors import BadBody, BridgeError, ClientDisconnected

    found = []
    for mod in pkgutil.walk_packages(trio_bridge.__path__, "trio_bridge."):
        if mod.name == "trio_bridge.__main__":
            continue
        module = importlib.import_module(mod.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("trio_bridge"):
                found.append(cls)
    assert len(found) > 10
    assert [c.__name__ for c in found if not issubclass(c, BridgeError)] == []
    assert not issubclass(BadBody, ClientDisconnected)  # a broken body is not a departure
