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
