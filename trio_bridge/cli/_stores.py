"""``keys`` / ``tokens`` (the secret stores) and ``usage`` (what each key used)."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import re
import sys
import time
from typing import Any

import attrs

from trio_bridge._config import Config, parse_duration
from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretEntry, SecretStore, check_route_patterns
from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._poolcli import StoreCLI
from trio_bridge.accounts._usagestore import read_rows, utc_day

log = logging.getLogger("trio_bridge.cli")

_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def limit_options(a: argparse.ArgumentParser, *, expires: bool) -> None:
    g = a.add_argument_group("limits (a number, e.g. 60, 20k, 1.5M; 'none' clears it)")
    g.add_argument("--concurrency", metavar="N", help="requests in progress at once")
    g.add_argument("--rpm", metavar="N", help="requests per minute")
    g.add_argument("--tokens-per-minute", "--tpm", metavar="N", help="tokens per minute")
    g.add_argument("--tokens-per-day", "--tpd", metavar="N", help="tokens per UTC day")
    g.add_argument(
        "--models",
        metavar="GLOB",
        action="append",
        help="an allowed model (globs such as 'qwen2.5-coder*'; repeat for more; 'none': any)",
    )
    g.add_argument("--priority", metavar="N", help="weight in the fair queue (1-100; default 1)")
    if expires:
        g.add_argument("--expires", metavar="IN", help="valid for this long (30d, 12h; 'none')")


def parse_count(value: str, option: str) -> int | None:
    """``60``, ``20k``, ``1.5M`` → an int; ``none`` → None."""
    if value.strip().lower() == "none":
        return None
    m = _COUNT_RE.match(value)
    if not m or float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()] < 1:
        raise ConfigError(f"{option}: expected a positive number such as 60, 20k or 1.5M, "
                          f"or 'none'; got {value!r}")  # fmt: skip
    return int(float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()])


def _limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The limit options given on the command line, as SecretStore changes."""
    changes: dict[str, Any] = {}
    for attr, option in (
        ("concurrency", "--concurrency"),
        ("rpm", "--rpm"),
        ("tokens_per_minute", "--tokens-per-minute"),
        ("tokens_per_day", "--tokens-per-day"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            changes[attr] = parse_count(value, option)
    if getattr(args, "models", None):
        changes["models"] = () if args.models == ["none"] else tuple(args.models)
    if getattr(args, "priority", None) is not None:
        priority = parse_count(args.priority, "--priority") or 1
        if priority > 100:
            raise ConfigError("--priority: from 1 to 100")
        changes["priority"] = priority
    if getattr(args, "expires", None) is not None:
        if args.expires.strip().lower() == "none":
            changes["expires"] = ""
        else:
            try:
                seconds = float(parse_duration(args.expires.replace("d", "") + "h"
                                if args.expires.endswith("d") else args.expires))  # fmt: skip
            except ValueError as exc:
                raise ConfigError(f"--expires: {exc} (or days: 30d)") from None
            if args.expires.endswith("d"):
                seconds *= 24
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # wall clock
            until = now + dt.timedelta(seconds=seconds)
            changes["expires"] = until.isoformat().replace("+00:00", "Z")
    return changes


def store_command(config: Config, args: argparse.Namespace) -> int:
    """``keys …`` (API keys, on the connector) and ``tokens …`` (connector tokens, broker)."""
    store, action, name = args.command, args.action, str(getattr(args, "name", ""))
    if action == "import":
        return _import_keys(config, args)
    s = _open_store(config, args)
    routes = check_route_patterns(getattr(args, "routes", None) or [])
    changes = _limit_changes(args) if store == "keys" else {}
    if action == "add":
        _store_add(s, store, name, routes, changes)
    elif action == "list":
        if store == "keys":
            _list_keys(s, config)
        else:
            _list_entries(s, store)
    elif action == "defaults":
        if changes:
            s.set_defaults(changes)
        print(f"defaults for every key in {s.path}: {_limits_text(s.defaults) or 'no limits'}")
    elif action == "set" and store == "keys":
        if not changes:
            raise ConfigError("keys set: give at least one limit option (see --help)")
        entry = s.set_limits(name, changes)
        print(
            f"{entry.name!r} (id {entry.id}): {_limits_text(s.limits_for(entry)) or 'no limits'}"
            f"{'; expires ' + entry.expires if entry.expires else ''}. A running connector "
            "applies it within a second."
        )
    elif action == "set":
        entries = s.set_routes(name, routes)
        print(
            f"{entries[0].name!r} may now serve: {entries[0].route_text}; relays on other "
            "routes are closed within a second"
        )
    elif action == "rotate":
        _store_rotate(s, store, name, args.grace)
    else:
        entry = s.revoke(name)
        print(
            f"revoked {entry.name!r} (id {entry.id}); running processes stop accepting it "
            "within a second"
        )
    return 0


def open_keys(config: Config) -> SecretStore:
    """The connector's API keys: the pool's store's when it has one, else its keys file."""
    if config.connector.store:
        return StoreCLI(config).keys()
    return SecretStore(config.path(config.connector.api_keys_file), "tbk")


def _open_store(config: Config, args: argparse.Namespace) -> SecretStore:
    """The secret store the command is about, from the config of the role it lives on."""
    store = args.command
    role = "connector" if store == "keys" else "broker"
    if config.sections and role not in config.sections:
        other = "connector tokens" if store == "keys" else "API keys"
        raise ConfigError(
            f"{config.source} has no [{role}] section: {store} live on the {role} "
            f"({other} on the other side); pass the {role}'s config file with -c"
        )
    if store == "keys" and config.connector.store:  # the pool's store holds them
        return StoreCLI(config).keys()
    if store == "keys":
        path, prefix = config.path(config.connector.api_keys_file), "tbk"
    else:
        path, prefix = config.path(config.broker.connector_tokens_file), "tbc"
    if args.config is None:
        print(f"# no -c given: using {path.resolve()} (the built-in default)", file=sys.stderr)
    return SecretStore(path, prefix)


def _store_add(
    s: SecretStore, store: str, name: str, routes: tuple[str, ...], changes: dict[str, Any]
) -> None:
    what = "API key" if store == "keys" else "connector token"
    expires = changes.pop("expires", "")
    entry, secret = s.add(
        name, routes=routes, limits=attrs.evolve(KeyLimits(), **changes), expires=expires
    )
    print(secret)
    scope = f"; it may serve: {entry.route_text}" if store == "tokens" else ""
    print(
        f"# {what} {entry.name!r} (id {entry.id}) added to {s.path}{scope}. It is shown "
        "only once: only its hash is stored.",
        file=sys.stderr,
    )
    if store == "tokens":
        print(
            "# On the connector machine, put it in the file named by connector.token_file "
            "(mode 0600) or in the TRIO_BRIDGE_TOKEN environment variable.",
            file=sys.stderr,
        )


def _store_rotate(s: SecretStore, store: str, name: str, grace_text: str) -> None:
    what = "API key" if store == "keys" else "connector token"
    try:
        grace = parse_duration(grace_text)
    except ValueError as exc:
        raise ConfigError(f"--grace: {exc}") from None
    entry, secret, until = s.rotate(name, float(grace))
    print(secret)
    print(
        f"# new {what} for {entry.name!r} (id {entry.id}) in {s.path}; the previous one "
        f"stays valid until {until}. Shown only once.",
        file=sys.stderr,
    )
    if store == "tokens":
        print(
            "# Write it to the connector's token_file: the connector re-reads that file and "
            "re-dials with the new token as soon as its relay is idle (no restart).",
            file=sys.stderr,
        )


def _limits_text(limits: KeyLimits) -> str:
    parts = []
    for attr, label in (
        ("concurrency", "concurrency"),
        ("rpm", "rpm"),
        ("tokens_per_minute", "tokens/min"),
        ("tokens_per_day", "tokens/day"),
    ):
        if (v := getattr(limits, attr)) is not None:
            parts.append(f"{label} {v}")
    if limits.models:
        parts.append("models " + ",".join(limits.models))
    if limits.priority != 1:
        parts.append(f"priority {limits.priority}")
    return ", ".join(parts)


def _list_keys(s: SecretStore, config: Config) -> None:
    """Keys with their limits (defaults applied) and today's usage from the usage store; an
    expired key is listed as such (``keys set NAME --expires …`` extends it)."""
    entries = s.entries()
    if not entries:
        print(f"(no keys in {s.path})")
        return
    today = utc_day(time.time())  # wall clock
    used: dict[str, list[int]] = {}
    if config.connector.store or config.connector.usage_file:
        for r in _usage_rows(config, today):
            u = used.setdefault(r["key_id"], [0, 0])
            u[0] += r["requests"]
            u[1] += r["prompt_tokens"] + r["completion_tokens"]
    # EXPIRES: a date, "<date> (expired)", "revoked <date>", or a rotation's old secret
    # "<date> (grace)" then "<date> (replaced)" (31 wide)
    print(f"{'NAME':<20} {'ID':<9} {'EXPIRES':<31} {'TODAY':<22} LIMITS")
    now = time.time()  # wall clock
    for e in entries:
        req, tok = used.get(e.id, [0, 0])
        expires = _expiry_text(e, now)
        print(
            f"{e.name:<20} {e.id:<9} {expires:<31} "
            f"{f'{req} req, {tok} tokens':<22} {_limits_text(s.limits_for(e)) or '-'}"
        )
    if s.defaults.limited or s.defaults.models:
        print(f"(defaults: {_limits_text(s.defaults)})")


def usage_command(config: Config, args: argparse.Namespace) -> int:
    if config.sections and "connector" not in config.sections:
        raise ConfigError(f"{config.source} has no [connector] section: usage lives there")
    if not config.connector.usage_file and not config.connector.store:
        raise ConfigError("connector.usage_file is empty: this connector keeps no usage")
    m = re.fullmatch(r"\s*(\d+)\s*d?\s*", args.since)
    if not m:
        raise ConfigError(f"--since: expected days such as 7d, got {args.since!r}")
    since = utc_day(time.time() - int(m.group(1)) * 86400)  # wall clock
    if args.config is None:
        print(
            f"# no -c given: using {config.path(config.connector.usage_file).resolve()} "
            "(the built-in default)",
            file=sys.stderr,
        )
    keys = (
        StoreCLI(config).keys()
        if config.connector.store
        else SecretStore(config.path(config.connector.api_keys_file), "tbk")
    )
    names = {e.id: e.name for e in keys.entries()}
    wanted = None
    if args.key:
        wanted = {e.id for e in keys.entries() if e.name in args.key or e.id in args.key}
        wanted |= {k for k in args.key if k not in names.values()}  # ids of deleted keys
    rows = [
        {"day": r["day"], "key": names.get(r["key_id"], "(revoked)"), **r}
        for r in _usage_rows(config, since)
        if wanted is None or r["key_id"] in wanted
    ]
    columns = ["day", "key", "key_id", "model", "requests", "prompt_tokens",
               "completion_tokens", "estimated", "errors", "refused"]  # fmt: skip
    if args.format == "json":
        print(json.dumps([{c: r[c] for c in columns} for r in rows], indent=1))
    elif args.format == "csv":
        out = csv.writer(sys.stdout)
        out.writerow(columns)
        out.writerows([[r[c] for c in columns] for r in rows])
    else:
        print(f"{'DAY':<11} {'KEY':<20} {'MODEL':<28} {'REQUESTS':>8} {'PROMPT':>10} "
              f"{'COMPLETION':>10} {'REFUSED':>7} {'ERRORS':>6}")  # fmt: skip
        for r in rows:
            est = "*" if r["estimated"] else " "
            print(
                f"{r['day']:<11} {r['key'][:20]:<20} {r['model'][:28]:<28} {r['requests']:>8} "
                f"{r['prompt_tokens']:>10} {r['completion_tokens']:>10}{est}{r['refused']:>7} "
                f"{r['errors']:>6}"
            )
        if not rows:
            print(f"(no usage since {since})")
        else:
            if any(r["estimated"] for r in rows):
                print(
                    "* some answers carried no token counts: estimated (one completion token "
                    "per streamed event, prompt tokens = request bytes / 4)"
                )
            print(
                "REQUESTS: every request of the key; REFUSED: of those, refused by the bridge "
                "(a limit's 429, the model allowlist, a bad request); ERRORS: failed (a 5xx, "
                "an answer broken off)"
            )
    return 0


def _usage_rows(config: Config, since_day: str) -> list[dict[str, Any]]:
    """Usage rows since ``since_day``: the pool's store's, else the usage file's."""
    if config.connector.store:
        return StoreCLI(config).usage_rows(since_day)
    return read_rows(config.path(config.connector.usage_file), since_day=since_day)


def _import_keys(config: Config, args: argparse.Namespace) -> int:
    """``keys import``: a keys file (and a usage file) into the pool's store. Keys already
    in the store stay as they are; the file's ``[defaults]`` apply if the store has none. The
    same usage file imported twice is counted once."""
    if not config.connector.store:
        raise ConfigError(
            'keys import: connector.store is not set (e.g. store = "redis://127.0.0.1:6379/0")'
        )
    cli = StoreCLI(config)
    source = SecretStore(config.path(args.file or config.connector.api_keys_file), "tbk")
    if not len(source) and not args.file:
        print(f"# {source.path}: no keys to import", file=sys.stderr)
    new = cli.keys().merge(source.entries(), source.defaults)
    print(
        f"{len(new)} keys imported from {source.path} into {cli.where} "
        f"({len(source) - len(new)} were there already)"
    )
    usage_file = args.usage if args.usage is not None else config.connector.usage_file
    if usage_file:
        rows = read_rows(config.path(usage_file))
        if not rows:
            print(f"no usage in {config.path(usage_file)}")
        elif cli.import_usage(rows):
            print(f"{len(rows)} usage rows imported from {config.path(usage_file)}")
        else:
            print(f"{config.path(usage_file)}: these usage rows were imported before (skipped)")
    return 0


def _expiry_text(e: SecretEntry, now: float) -> str:
    if e.revoked:
        return f"revoked {e.revoked}"
    if e.replaced:  # a rotation's old secret: valid in its grace, then kept 30 days
        return f"{e.expires or '-'} ({'replaced' if e.expired(now) else 'grace'})"
    return f"{e.expires} (expired)" if e.expired(now) else (e.expires or "-")


def _list_entries(s: SecretStore, store: str) -> None:
    entries = s.entries()
    if not entries:
        print(f"(no entries in {s.path})")
        return
    extra = "ROUTES" if store == "tokens" else ""
    print(f"{'NAME':<24} {'ID':<10} {'CREATED':<21} {'EXPIRES':<31} {extra}".rstrip())
    now = time.time()  # wall clock
    for e in entries:
        expires = _expiry_text(e, now)
        routes = e.route_text if store == "tokens" else ""
        print(f"{e.name:<24} {e.id:<10} {e.created:<21} {expires:<31} {routes}".rstrip())
