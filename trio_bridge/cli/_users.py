"""``trio-bridge users list|approve|block|set|audit``: the portal's users (docs/portal.md),
from the connector's ``[portal] users_file`` and keys file; works while the connector runs (both
files are shared: a blocked user's key is refused within a second)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from trio_bridge._config import Config
from trio_bridge._errors import ConfigError
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.accounts._users import User, UserStore, approve, block, set_limits
from trio_bridge.cli._stores import _limit_changes, limit_options, open_keys


def add_users_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "users",
        help="the self-service portal's users (connector side)",
        description="The portal's users: approve, block, set their limits, read the audit log.",
    )
    ssub = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help in (
        ("list", "every user: state, key, last sign-in"),
        ("approve", "let a pending (or blocked) user make their key"),
        ("block", "revoke the user's key at once, end their sessions, refuse their sign-ins"),
        ("set", "the user's limits (their key's too; 'none' clears one)"),
        ("audit", "the audit log, newest first: sign-ins, keys, approvals, blocks"),
    ):
        a = ssub.add_parser(action, help=help, description=help)
        if action in ("approve", "block", "set"):
            a.add_argument("who", help="the user's email address or number")
        if action == "audit":
            a.add_argument("who", nargs="?", help="only this user (email address)")
            a.add_argument("--limit", type=int, default=50, help="entries (default 50)")
        if action in ("list", "audit"):
            a.add_argument("--json", action="store_true", help="print JSON")
        if action == "set":
            limit_options(a, expires=False)
        a.add_argument("-c", "--config", help="path to the connector's bridge.toml")


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")


def users_command(config: Config, args: argparse.Namespace) -> int:
    if args.config is None:
        print("# no -c given: using the built-in defaults' files", file=sys.stderr)
    path = config.path(config.portal.users_file)
    if not path.exists():
        if args.action in ("list", "audit"):
            print(f"no portal users yet ({path} does not exist: has the portal run?)")
            return 0
        raise ConfigError(f"{path}: no portal users file (has the portal run?)")
    users = UserStore(path)
    keys = open_keys(config)
    if args.action == "list":
        docs = [_listed(u, keys) for u in users.users()]
        if args.json:
            print(json.dumps(docs, indent=1))
            return 0
        if not docs:
            print("no portal users yet")
            return 0
        print(f"{'ID':>4}  {'EMAIL':<32} {'STATE':<8} {'KEY':<10} {'LAST SIGN-IN':<17} LIMITS")
        for d in docs:
            limits = ", ".join(f"{k}={v}" for k, v in d["limits"].items()) or "[defaults]"
            print(f"{d['id']:>4}  {d['email']:<32} {d['state']:<8} {d['key'] or '-':<10} "
                  f"{_when(d['last_login']):<17} {limits}")  # fmt: skip
        return 0
    if args.action == "audit":
        entries = users.audit_log(args.limit, args.who)
        if args.json:
            print(json.dumps(entries, indent=1))
            return 0
        for e in entries:
            print(f"{_when(e['time'])}  {e['event']:<15} {e['email']:<32} {e['actor']:<8} "
                  f"{e['detail']}")  # fmt: skip
        return 0
    user = users.find(args.who)
    if args.action == "approve":
        print(approve(users, user, "operator"))
    elif args.action == "block":
        print(block(users, keys, user, "operator"))
    elif args.action == "set":
        changes = _limit_changes(args)
        if not changes:
            raise ConfigError("users set: give at least one limit (e.g. --rpm 60)")
        print(set_limits(users, keys, user, changes, "operator"))
    return 0


def _listed(user: User, keys: SecretStore) -> dict[str, Any]:
    doc = user.doc()
    usable = [e for e in keys.entries() if e.name == user.key_name and e.usable()]
    doc["key"] = usable[-1].id if usable else None
    return doc
