"""`disagg keys ...` and `disagg tenants ...`: API keys and tenant limits in the cluster's Redis.

    disagg keys create --tenant acme          # prints the key once, on stdout (its id on stderr)
    disagg keys list [--tenant acme]          # id, tenant, created, last used, revoked
    disagg keys revoke key_0123456789ab       # refused by gateways within their cache time
    disagg keys delete key_0123456789ab       # forget a revoked key (no key left: no authentication)
    disagg tenants set acme --requests-per-minute 60 --tokens-per-minute 100000 --monthly-budget-usd 50
    disagg tenants list [--month 2025-01]     # limits, active keys, the month's usage and spend

Every command takes `--redis-url` (default: DISAGG_REDIS_URL, else redis://127.0.0.1:6379/0) and the
key prefix of DISAGG_REDIS_KEY_PREFIX, like the pods. Keys are stored as SHA-256 hashes only
(services/core/api_keys.py); `create` is the one place a key is ever shown. Gateways pick changes up
within their cache time (1 s by default). See docs/tenants.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from rich.console import Console
from rich.table import Table

from services.core.api_keys import ApiKeyStore
from services.core.errors import DisaggError
from services.core.registry import RedisSettings, connect
from services.core.tenants import TenantLimits, TenantStore, check_tenant, current_month

V = TypeVar("V")
MONTH_PATTERN = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
UNSET = "none"  # the value that removes a limit
KEEP: Any = object()  # the default of `tenants set` flags: keep the tenant's current value


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys (stored hashed in Redis)")
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys.add_parser("create", help="make a key for a tenant; the key is printed once")
    create.add_argument("--tenant", required=True, help="the tenant the key authenticates as")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="every key: id, tenant, created, last used, revoked")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id (gateways refuse it within ~1 s)")
    revoke.add_argument("key_id", help="the id `disagg keys list` shows, e.g. key_0123456789ab")
    revoke.set_defaults(func=cmd_keys_revoke)
    delete = keys.add_parser(
        "delete", help="forget a revoked key; with no key left the gateway serves everyone as `default`"
    )
    delete.add_argument("key_id")
    delete.set_defaults(func=cmd_keys_delete)
    for command in (create, listing, revoke, delete):
        _add_redis_arg(command)


def add_tenants_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tenants", help="set and list tenant limits, usage and monthly spend")
    tenants = p.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    update = tenants.add_parser(
        "set", help=f"change a tenant's limits (flags not given keep their value; `{UNSET}` removes one)"
    )
    update.add_argument("tenant")
    limit = {"default": KEEP}
    update.add_argument("--requests-per-minute", type=_int_or_unset, help=f"N or {UNSET}", **limit)
    update.add_argument(
        "--tokens-per-minute",
        type=_int_or_unset,
        help=f"prompt + max_tokens per minute: N or {UNSET}",
        **limit,
    )
    update.add_argument(
        "--monthly-budget-usd",
        type=_float_or_unset,
        help=f"$ per UTC month (0 blocks the tenant) or {UNSET}",
        **limit,
    )
    update.set_defaults(func=cmd_tenants_set)
    listing = tenants.add_parser("list", help="limits, active keys and the month's usage of every tenant")
    listing.add_argument("--month", help="YYYY-MM, UTC (default: this month)")
    listing.set_defaults(func=cmd_tenants_list)
    for command in (update, listing):
        _add_redis_arg(command)


# ---- commands ----------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    check_tenant(args.tenant)
    with _redis(args) as (client, settings):
        key, record = ApiKeyStore(client, settings).create(args.tenant)
    print(key, flush=True)
    print(
        f"created API key {record.key_id} for tenant {record.tenant}; this is the only time it is shown",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _redis(args) as (client, settings):
        records = ApiKeyStore(client, settings).list(args.tenant)
    table = Table("id", "tenant", "created (UTC)", "last used (UTC)", "revoked (UTC)")
    for r in records:
        table.add_row(
            r.key_id,
            r.tenant,
            _when(r.created_at),
            _when(r.last_used_at, "never"),
            _when(r.revoked_at, "-"),
        )
    _console().print(table)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _redis(args) as (client, settings):
        revoked = ApiKeyStore(client, settings).revoke(args.key_id)
    print(f"API key {args.key_id} {'revoked' if revoked else 'was already revoked'}", file=sys.stderr)
    return 0


def cmd_keys_delete(args: argparse.Namespace) -> int:
    with _redis(args) as (client, settings):
        store = ApiKeyStore(client, settings)
        store.delete(args.key_id)
        left = store.any_keys()
    note = "" if left else "; no API keys are left: gateways now serve every request as tenant `default`"
    print(f"API key {args.key_id} deleted{note}", file=sys.stderr)
    return 0


def cmd_tenants_set(args: argparse.Namespace) -> int:
    check_tenant(args.tenant)
    with _redis(args) as (client, settings):
        store = TenantStore(client, settings)
        old = store.limits(args.tenant)
        new = TenantLimits(
            requests_per_minute=_pick(args.requests_per_minute, old.requests_per_minute),
            tokens_per_minute=_pick(args.tokens_per_minute, old.tokens_per_minute),
            monthly_budget_usd=_pick(args.monthly_budget_usd, old.monthly_budget_usd),
        )
        store.set_limits(args.tenant, new)
    print(f"tenant {args.tenant}: {_describe(new)}", file=sys.stderr)
    return 0


def cmd_tenants_list(args: argparse.Namespace) -> int:
    month = args.month or current_month()
    if not MONTH_PATTERN.fullmatch(month):
        raise DisaggError(f"--month must be YYYY-MM, got {month!r}")
    with _redis(args) as (client, settings):
        store = TenantStore(client, settings)
        keys = ApiKeyStore(client, settings).list()
        names = sorted(set(store.tenants()) | {k.tenant for k in keys})
        rows = [(name, store.limits(name), store.usage(name, month)) for name in names]
    table = Table(
        "tenant", "active keys", "requests/min", "tokens/min", "budget $/month",
        f"spend $ {month}", f"requests {month}", f"tokens {month}",
    )  # fmt: skip
    for name, limits, usage in rows:
        active = sum(1 for k in keys if k.tenant == name and k.active)
        table.add_row(
            name,
            str(active),
            _limit_text(limits.requests_per_minute),
            _limit_text(limits.tokens_per_minute),
            "-" if limits.monthly_budget_usd is None else f"{limits.monthly_budget_usd:.2f}",
            f"{usage.cost_usd:.4f}",
            str(usage.requests),
            str(usage.prompt_tokens + usage.completion_tokens),
        )
    _console().print(table)
    return 0


# ---- helpers -----------------------------------------------------------------------------------


def _add_redis_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url", help="the cluster's Redis (default: DISAGG_REDIS_URL or redis://127.0.0.1:6379/0)"
    )


@contextmanager
def _redis(args: argparse.Namespace) -> Iterator[tuple[redis.Redis, RedisSettings]]:
    """A client for the command; Redis errors become one line naming the URL and the fix."""
    settings = RedisSettings(url=args.redis_url) if args.redis_url else RedisSettings()
    client = connect(settings)
    try:
        yield client, settings
    except redis.RedisError as exc:
        raise DisaggError(
            f"cannot use Redis at {settings.url}: {exc}; pass --redis-url or set DISAGG_REDIS_URL"
        ) from exc
    finally:
        client.close()


def _pick(given: Any, old: V) -> V:
    return old if given is KEEP else given


def _int_or_unset(text: str) -> int | None:
    return None if text.lower() == UNSET else int(_number(text, int))


def _float_or_unset(text: str) -> float | None:
    return None if text.lower() == UNSET else float(_number(text, float))


def _number(text: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or `{UNSET}`, got {text!r}") from None


def _when(unix_s: float | None, missing: str = "-") -> str:
    return missing if unix_s is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_s))


def _limit_text(value: int | None) -> str:
    return "-" if value is None else str(value)


def _describe(limits: TenantLimits) -> str:
    if limits.unlimited:
        return "no limits"
    parts = [
        f"{limits.requests_per_minute} requests/min" if limits.requests_per_minute else "",
        f"{limits.tokens_per_minute} tokens/min" if limits.tokens_per_minute else "",
        f"${limits.monthly_budget_usd:.2f}/month" if limits.monthly_budget_usd is not None else "",
    ]
    return ", ".join(p for p in parts if p)


def _console() -> Console:
    # Piped output (scripts, tests) gets full-width rows instead of rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 200)
