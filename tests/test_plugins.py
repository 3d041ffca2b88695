"""The plugin framework: discovery, blocking, overriding built-ins, and every hook."""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from flask import Blueprint

from emix_core import hookspecs
from emix_core.errors import ConfigError, PolicyRejected
from emix_core.plugins import get_plugin_manager, hookimpl, plugin_info
from emix_core.testing import PATIENT_NAME, emix, emix_json
from tests.conftest import ROOT
from tests.plugin_tools import install_plugin, pip_install

HOOKS = [name for name in hookspecs.__all__ if name.startswith("emix_")]


def test_every_hookspec_is_exported_typed_and_documented():
    declared = {
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("emix_")
    }
    assert declared == set(HOOKS)
    for name in HOOKS:
        func = getattr(hookspecs, name)
        doc = inspect.getdoc(func) or ""
        assert len(doc) > 40, f"{name} has no docstring"
        for param in inspect.signature(func).parameters:
            assert f":param {param}:" in doc, f"{name}: parameter {param} undocumented"
        assert ".. versionadded::" in doc, f"{name}: say in which release it was added"
        spec_opts = func.emix_spec
        if spec_opts.get("firstresult"):
            assert "firstresult: stops at the first" in doc, f"{name}: say what firstresult means"


def test_every_hook_has_a_method_on_the_facade():
    """Hooks are called in one place: a hookspec without a Hooks method would be called ad hoc."""
    from emix_core.plugins import Hooks

    methods = {n for n in dir(Hooks) if not n.startswith("_")}
    aliases = {"emix_register_report_formats": "report_formats"}
    for name in HOOKS:
        assert aliases.get(name, name.removeprefix("emix_")) in methods, name


def test_no_module_calls_a_hook_directly():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in [*ROOT.glob("emix_core/**/*.py"), *ROOT.glob("plugins/*/emix_*/**/*.py")]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ".hook.emix_" in line and path.name != "plugins.py"
    ]
    assert offenders == [], "call hooks through emix_core.hooks_for(pm)"


def test_every_hookspec_has_a_test():
    sources = [p for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_plugins.py"]
    sources += list((ROOT / "plugins").glob("*/tests/test_*.py"))
    sources.append(Path(__file__))
    # examples and adapters are exercised by their own tests
    sources += list((ROOT / "examples").rglob("*.py"))
    sources += [p for p in (ROOT / "plugins").glob("*/emix_*/**/*.py")]
    text = "\n".join(p.read_text() for p in sources)
    # a hook counts as tested when a test, an example or an adapter (all tested) implements it
    untested = [h for h in HOOKS if not re.search(rf"def {h}\(", text)]
    assert untested == []


@pytest.mark.e2e  # a real process
def test_builtins_are_plugins_and_listed_with_their_hooks():
    data = emix_json("plugins")
    names = {p["name"]: p for p in data["plugins"]}
    for builtin in (
        "emix.tokens",
        "emix.smtp",
        "emix.filesystem-store",
        "emix.keyfile",
        "emix.reports",
    ):
        assert names[builtin]["builtin"] is True
    assert "emix_authenticate" in names["emix.tokens"]["hooks"]
    assert names["emix.smtp"]["hooks"] == ["emix_notify"]


def test_example_vendor_plugin_installs_with_pip_and_forwards_audit_events(
    tmp_path, hub, mercy, study_200
):
    target = pip_install(ROOT / "examples" / "emix-audit-jsonl", tmp_path / "site")
    jsonl = tmp_path / "audit.jsonl"
    env = {**mercy.env, "PYTHONPATH": str(target), "EMIX_AUDIT_JSONL": str(jsonl)}
    plugins = {p["name"]: p for p in emix_json("plugins", env=env)["plugins"]}
    assert plugins["audit_jsonl"]["distribution"] == "emix-audit-jsonl"
    assert plugins["audit_jsonl"]["version"] == "0.1.0"
    assert plugins["audit_jsonl"]["hooks"] == ["emix_audit_event"]
    folder = tmp_path / "one"
    folder.mkdir()
    src = next(study_200.rglob("*.dcm"))
    (folder / src.name).write_bytes(src.read_bytes())
    emix_json("send", str(folder), "--to", "lakeside", env=env)
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert {"begin-transferring", "instances-transferred"} <= {e["type"] for e in events}
    assert PATIENT_NAME not in jsonl.read_text()
    # blocked by name, it is not loaded
    blocked = emix_json("plugins", env={**env, "EMIX_DISABLED_PLUGINS": "audit_jsonl"})
    assert "audit_jsonl" not in {p["name"] for p in blocked["plugins"]}


def test_disabling_a_builtin_plugin(monkeypatch):
    monkeypatch.setenv("EMIX_DISABLED_PLUGINS", "emix.smtp, emix.reports")
    names = {row["name"] for row in plugin_info(get_plugin_manager())}
    assert "emix.smtp" not in names and "emix.reports" not in names
    assert "emix.tokens" in names


@pytest.mark.e2e  # a real process
def test_a_plugin_that_fails_to_import_is_named(tmp_path):
    target = install_plugin(tmp_path, "broken", "import not_a_module_anywhere\n")
    result = emix("plugins", env={"PYTHONPATH": str(target)}, check=False)
    assert result.returncode == 1
    assert "plugin 'broken'" in result.stderr and "EMIX_DISABLED_PLUGINS=broken" in result.stderr
    ok = emix("plugins", env={"PYTHONPATH": str(target), "EMIX_DISABLED_PLUGINS": "broken"})
    assert ok.returncode == 0


@pytest.mark.e2e  # a real process
def test_a_plugin_implementing_an_unknown_hook_is_refused(tmp_path):
    target = install_plugin(
        tmp_path,
        "typo",
        """
        from emix_core.plugins import hookimpl
        @hookimpl
        def emix_notfiy(recipient, email, package, link):
            return True
    """,
    )
    sys.path.insert(0, str(target))
    try:
        with pytest.raises(ConfigError, match="typo"):
            get_plugin_manager()
    finally:
        sys.path.remove(str(target))


class _Recorder:
    """In-process plugin implementing the host hooks."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def emix_register_commands(self, cli: click.Group) -> None:
        @click.command("hello-vendor")
        def hello() -> None:
            click.echo("hello from a vendor")

        cli.add_command(hello)

    @hookimpl
    def emix_register_blueprints(self, register) -> None:
        bp = Blueprint("vendor", __name__)
        bp.add_url_rule("/vendor/ping", "ping", lambda: "pong")
        register(bp)

    @hookimpl
    def emix_register_stores(self, register) -> None:
        register("memory", lambda url, home: {"url": url, "home": home})

    @hookimpl
    def emix_key_wrapper(self, home: str):
        return _XorWrapper()


class _XorWrapper:
    """A toy key provider (an HSM plugin would call its device here)."""

    def wrap(self, key: bytes, context: bytes) -> bytes:
        return b"xor:" + bytes(b ^ 0x5A for b in key)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in wrapped[4:])


def test_host_hooks_add_commands_endpoints_stores_and_key_providers(tmp_path):
    from emix_core.cli.main import build_cli
    from emix_core.hub import create_app
    from emix_core.hub.context import init_hub_home
    from emix_core.store.blobs import open_blob_store

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(_Recorder(), name="recorder")
    cli = build_cli(pm)
    result = CliRunner().invoke(cli, ["hello-vendor"])
    assert result.output.strip() == "hello from a vendor"

    init_hub_home(tmp_path / "hub")
    app = create_app(tmp_path / "hub", pm)
    assert app.test_client().get("/vendor/ping").data == b"pong"
    assert open_blob_store(pm, "memory:x", tmp_path) == {"url": "memory:x", "home": tmp_path}
    # the installed key provider answers before the built-in key file
    assert isinstance(app.extensions["emix"].wrapper, _XorWrapper)


def test_authentication_and_authorization_can_be_extended_but_deny_wins(tmp_path):
    from emix_core.hub import create_app
    from emix_core.hub.context import init_hub_home
    from emix_core.model import Principal

    class HeaderAuth:
        @hookimpl
        def emix_authenticate(self, request):
            if request.headers.get("X-Test-User"):
                return Principal(member_id=1, facility="mercy", email="sso@mercy.example.org")
            return None

    class DenyAll:
        @hookimpl
        def emix_authorize(self, principal, action, resource):
            return False

    init_hub_home(tmp_path / "hub")
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(HeaderAuth(), name="sso")
    app = create_app(tmp_path / "hub", pm)
    client = app.test_client()
    assert (
        client.get("/api/v1/me", headers={"X-Test-User": "1"}).json["email"]
        == "sso@mercy.example.org"
    )
    assert client.get("/api/v1/me").status_code == 401
    pm.register(DenyAll(), name="deny")
    r = client.post("/api/v1/packages", json={"to": ["x"]}, headers={"X-Test-User": "1"})
    assert r.status_code == 404  # denied looks like absent


def test_before_send_policy_can_refuse_a_package(tmp_path, hub, mercy, study_200):
    from emix_core.client.home import LocalHome
    from emix_core.client.sender import send_paths

    class NoCT:
        @hookimpl
        def emix_before_send(self, package):
            if any(s.get("modalities") == ["CT"] for s in package.studies):
                raise PolicyRejected("CT studies must be de-identified before leaving")

    pm = get_plugin_manager(load_entry_points=False)
    pm.register(NoCT(), name="policy")
    home = LocalHome(tmp_path / "h", pm=pm)
    with pytest.raises(PolicyRejected, match="de-identified"):
        send_paths(
            [next(study_200.rglob("*.dcm"))],
            ["lakeside"],
            client=home.client(hub.url, mercy.token),
            home=home,
        )


def test_exchange_hooks_fire_on_the_hub_and_the_receiving_side(tmp_path, smtp_server, study_200):
    from emix_core.testing import make_hub, side

    target = install_plugin(
        tmp_path,
        "watcher",
        """
        import json, os
        from emix_core.plugins import hookimpl

        def _log(kind, **data):
            with open(os.environ["WATCHER_LOG"], "a") as f:
                f.write(json.dumps({"kind": kind, **data}) + "\\n")

        @hookimpl
        def emix_package_sealed(package):
            _log("sealed", id=package.id, items=len(package.items))

        @hookimpl
        def emix_package_received(package, path):
            _log("received", id=package.id, path=path)

        @hookimpl
        def emix_notify(recipient, email, package, link):
            _log("notify", email=email, link=link)
            return True   # handled: the built-in SMTP notifier is not used
    """,
    )
    log = tmp_path / "watcher.jsonl"
    env = {"PYTHONPATH": str(target), "WATCHER_LOG": str(log), "EMIX_SMTP_URL": smtp_server.url}
    hub = make_hub(tmp_path, env=env)
    try:
        hub.add_facility("Mercy", "a@m.example.org", "mercy")
        hub.add_facility("Lake", "b@l.example.org", "lakeside")
        sender, recipient = side(tmp_path, hub, "mercy"), side(tmp_path, hub, "lakeside")
        one = tmp_path / "one"
        one.mkdir()
        src = next(study_200.rglob("*.dcm"))
        (one / src.name).write_bytes(src.read_bytes())
        package = emix_json("send", str(one), "--to", "lakeside", env={**sender.env, **env})[
            "package"
        ]
        emix_json("receive", package, "--out", str(tmp_path / "in"), env={**recipient.env, **env})
    finally:
        hub.stop()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds == ["sealed", "notify", "received"]
    assert events[0] == {"kind": "sealed", "id": package, "items": 1}
    assert events[1]["link"].startswith(f"{hub.url}/signin/")  # a one-time sign-in link
    assert events[2]["path"].endswith(package)
    assert smtp_server.messages == []  # the plugin answered first
    assert os.path.isdir(events[2]["path"])


def test_a_failing_sealed_notification_neither_fails_the_send_nor_skips_the_mail(
    tmp_path, smtp_server, study_200
):
    """Regression: a plugin whose emix_package_sealed raises used to make the hub answer 500
    after sealing, `emix send` exit 1, and the recipient never got the mail."""
    from emix_core.testing import make_hub, side

    target = install_plugin(
        tmp_path,
        "brokenseal",
        """
        from emix_core import hookimpl

        @hookimpl
        def emix_package_sealed(package):
            raise RuntimeError("the vendor's webhook is down")
    """,
    )
    env = {"PYTHONPATH": str(target), "EMIX_SMTP_URL": smtp_server.url}
    hub = make_hub(tmp_path, env=env)
    try:
        hub.add_facility("Mercy", "a@m.example.org", "mercy")
        hub.add_facility("Lake", "b@l.example.org", "lakeside")
        sender = side(tmp_path, hub, "mercy")
        one = tmp_path / "one"
        one.mkdir()
        src = next(study_200.rglob("*.dcm"))
        (one / src.name).write_bytes(src.read_bytes())
        result = emix("send", str(one), "--to", "lakeside", "--json", env={**sender.env, **env})
        assert json.loads(result.stdout)["package"]
        mails = smtp_server.wait_for(1)
    finally:
        hub.stop()
    assert result.returncode == 0
    assert [m["To"] for m in mails] == ["b@l.example.org"]
    assert f"{hub.url}/signin/" in mails[0].get_payload(decode=True).decode()
    log = (hub.home / "hub-test.log").read_text()
    assert "brokenseal failed in emix_package_sealed" in log
