"""What plugins that add pages use: records shared by the hub's processes, their own config
table, signing in a member another party vouched for, and the framing policy."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import Response

from emix_core import (
    ConfigError,
    PluginRecords,
    hub_config_table,
    sign_in_member,
    verified_member,
)


def test_records_are_single_use_expire_and_keep_no_key_in_clear(hub_app):
    with hub_app.app.test_request_context():
        records = PluginRecords("test-plugin")
        records.put("secret-state", {"verifier": "v"}, timedelta(minutes=5))
        assert records.get("secret-state") == {"verifier": "v"}
        assert records.take("secret-state") == {"verifier": "v"}
        assert records.take("secret-state") is None  # a replay finds nothing
        records.put("old", {"a": 1}, timedelta(seconds=-1))
        assert records.get("old") is None and records.take("old") is None
        assert PluginRecords("other-plugin").get("secret-state") is None
        records.put("kept", {"a": 1}, timedelta(minutes=5))
        # a group: each record its own row, taken together, once
        for n in range(3):
            records.put(f"queued-{n}", {"n": n}, timedelta(minutes=5), group="facility-a")
        records.put("late", {"n": 9}, timedelta(seconds=-1), group="facility-a")
        records.put("other", {"n": 7}, timedelta(minutes=5), group="facility-b")
        assert records.take_group("facility-a") == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert records.take_group("facility-a") == []
        assert records.take_group("facility-b") == [{"n": 7}]
    raw = (hub_app.home / "metadata.db").read_bytes()
    assert b"secret-state" not in raw and b"kept" not in raw


def test_config_table_of_a_plugin_and_core_tables_refused(hub_app):
    config = hub_app.home / "emix.toml"
    config.write_text(config.read_text() + '\n[acme]\nurl = "https://acme.example.org"\n')
    with hub_app.app.test_request_context():
        assert hub_config_table("acme") == {"url": "https://acme.example.org"}
        assert hub_config_table("absent") == {}
        with pytest.raises(ConfigError):
            hub_config_table("hub")


def test_a_vouched_member_is_signed_in_and_an_unknown_address_is_not(hub_app):
    with hub_app.app.test_request_context():
        assert verified_member("nobody@example.org") is None
        member = verified_member("IT@lakeside.example.org ")
        assert member is not None and member.facility == "lakeside"
        response = sign_in_member(Response("ok"), member.member_id, detail="signed in by test")
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("emix_session=") and "HttpOnly" in cookie
    client = hub_app.client
    client.set_cookie("emix_session", cookie.split(";")[0].split("=", 1)[1])
    assert client.get("/inbox").status_code == 200


def test_pages_are_not_framed_unless_they_name_who_may(hub_app):
    page = hub_app.client.get("/")
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]

    from emix_core.hub.app import security_headers

    framed = Response("in an iframe")
    framed.headers["Content-Security-Policy"] = "frame-ancestors https://emr.example.org"
    answer = security_headers(framed)
    assert "X-Frame-Options" not in answer.headers
    assert answer.headers["Content-Security-Policy"] == "frame-ancestors https://emr.example.org"
    assert security_headers(Response("page")).headers["X-Frame-Options"] == "DENY"
