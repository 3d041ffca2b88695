"""``emix doctor``: check a facility's setup end to end and say what to fix."""

from __future__ import annotations

import stat
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from emix_core.cli.util import emit_json, home_option, hub_option, json_option, token_option
from emix_core.config import CONFIG_NAME, resolve_home
from emix_core.errors import EmixError

if TYPE_CHECKING:
    import requests

#: Clock skew (seconds) that is reported as a warning, and as a failure.
SKEW_WARN, SKEW_FAIL = 30, 300


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str


def _permissions(home: Path) -> list[Check]:
    checks: list[Check] = []
    if not home.exists():
        return [Check("home", "fail", f"{home} does not exist; run a command with --home once")]
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o077:
        checks.append(
            Check("home", "warn", f"{home} is mode {mode:o}; others can look in: chmod 700 {home}")
        )
    else:
        checks.append(Check("home", "ok", f"{home} (mode {mode:o})"))
    config = home / CONFIG_NAME
    if config.exists():
        cmode = stat.S_IMODE(config.stat().st_mode)
        try:
            client = tomllib.loads(config.read_text("utf-8")).get("client", {})
            has_token = bool(client.get("token"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            has_token = False
        if has_token and cmode & 0o044:
            checks.append(
                Check(
                    "config-permissions",
                    "fail",
                    f"{config} holds an API token and is readable by others (mode {cmode:o}): "
                    f"chmod 600 {config}, then `emix token rotate`",
                )
            )
        else:
            checks.append(Check("config-permissions", "ok", f"{config} (mode {cmode:o})"))
    for key in sorted((home / "keys").glob("*.key")):
        kmode = stat.S_IMODE(key.stat().st_mode)
        if kmode & 0o077:
            checks.append(
                Check("key-permissions", "fail", f"{key} is mode {kmode:o}: chmod 600 {key}")
            )
    return checks


def _reachability(base: str, verify: bool | str) -> tuple[Check, requests.Response | None]:
    import requests

    from emix_core.client.diagnose import connection_cause

    try:
        response = requests.get(f"{base}/healthz", timeout=15, verify=verify, allow_redirects=False)
    except requests.RequestException as exc:
        kind, message = connection_cause(base, exc)
        return Check("hub", "fail", f"{message} [{kind}]"), None
    if response.status_code != 200 or response.text.strip() != "ok":
        return (
            Check(
                "hub",
                "fail",
                f"the server at {base} is not an emix hub (/healthz answered "
                f"{response.status_code}); check the hub URL",
            ),
            None,
        )
    return Check("hub", "ok", f"{base} answers as an emix hub"), response


def _clock(response: requests.Response) -> Check:
    date = response.headers.get("Date")
    if not date:
        return Check("clock", "skip", "the hub sent no Date header")
    skew = time.time() - parsedate_to_datetime(date).timestamp()
    status = "fail" if abs(skew) > SKEW_FAIL else "warn" if abs(skew) > SKEW_WARN else "ok"
    advice = "" if status == "ok" else "; enable time sync (chrony or systemd-timesyncd)"
    ahead = "ahead of" if skew > 0 else "behind"
    return Check("clock", status, f"this machine is {abs(skew):.0f} s {ahead} the hub{advice}")


def run_checks(home_arg: str | None, hub_url: str | None, token: str | None) -> list[Check]:
    """Every check, in order; later ones are skipped when an earlier one makes them moot."""
    from emix_core.client.home import LocalHome

    home = resolve_home(home_arg)
    checks = _permissions(home)
    try:
        local = LocalHome(home)
        verify = local.config.tls_verify
        base = (hub_url or local.config.client.hub_url).rstrip("/")
        token = token or local.config.client.token
    except EmixError as exc:
        return [*checks, Check("config", "fail", exc.message)]
    if not base:
        return [*checks, Check("config", "fail", "no hub URL: pass --hub, set EMIX_HUB_URL or "
                               "[client] hub_url in emix.toml")]  # fmt: skip
    checks.append(Check("config", "ok", f"hub {base}, TLS verify: {verify}"))
    reach, response = _reachability(base, verify)
    checks.append(reach)
    if response is None:
        return checks
    checks.append(_clock(response))
    if not token:
        return [*checks, Check("token", "fail", "no API token: pass --token or set EMIX_TOKEN")]
    try:
        client = local.client(base, token)
        me = client.me()
    except EmixError as exc:
        return [*checks, Check("token", "fail", exc.message)]
    checks.append(Check("token", "ok", f"{me['email']} ({me['role']}) of {me['facility']}"))
    checks.extend(_keys(local, client, me["facility"]))
    return checks


def _keys(local: Any, client: Any, facility: str) -> list[Check]:
    from emix_core.crypto import fingerprint_of

    checks: list[Check] = []
    own = local.signing_key.fingerprint if (local.path / "keys" / "facility-signing.key").exists() \
        else None  # fmt: skip
    try:
        listed = client.facility_key(facility)["fingerprint"]
    except EmixError:
        listed = None
    if own is None:
        checks.append(Check("signing-key", "warn", "no facility signing key yet; the first "
                            "`emix send` or `emix receive` creates and registers it"))  # fmt: skip
    elif listed != own:
        checks.append(Check("signing-key", "fail", "the hub lists another signing key for "
                            f"{facility} than this home's (another home sent last?); "
                            "`emix send` registers this one"))  # fmt: skip
    else:
        checks.append(Check("signing-key", "ok", f"registered, fingerprint {own}"))
    bad = []
    pins = local._pins()
    for name, pinned in sorted(pins.items()):
        if not name.startswith("facility:"):
            continue
        try:
            current = fingerprint_of(client.facility_key(name.split(":", 1)[1])["public_key"])
        except EmixError:
            continue
        if current != pinned:
            bad.append(name.split(":", 1)[1])
    if bad:
        checks.append(Check("pins", "fail", f"signing keys changed since pinned: {', '.join(bad)}"
                            "; confirm by phone, then `emix keys forget NAME`"))  # fmt: skip
    else:
        checks.append(Check("pins", "ok", f"{len(pins)} pinned keys match the hub"))
    return checks


@click.command()
@hub_option
@token_option
@home_option
@json_option
def doctor(hub_url: str | None, token: str | None, home: str | None, as_json: bool) -> None:
    """Check this facility's setup: config, permissions, hub, TLS, token, keys, clock.

    Exit 0 when nothing failed (warnings allowed), 1 otherwise.
    """
    checks = run_checks(home, hub_url, token)
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        emit_json({"ok": not failed, "checks": [asdict(c) for c in checks]})
    else:
        colours = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "white"}
        for c in checks:
            label = click.style(f"{c.status:<4}", fg=colours[c.status], bold=c.status == "fail")
            click.echo(f"{label}  {c.name:<18} {c.detail}")
    sys.exit(1 if failed else 0)
