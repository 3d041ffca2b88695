"""A missing watch or inbox folder is refused (an unmounted share), unless create = true."""

from __future__ import annotations

from pathlib import Path

from emix_core.testing import emix, free_port


def write_config(root: Path, outbox: str, inbox: str, extra: str = "") -> Path:
    config = root / "gateway.toml"
    config.write_text(
        "[gateway]\n"
        'home = "home"\n'
        f'hub_url = "http://127.0.0.1:{free_port()}"\n'
        'token = "emix_unused"\n'
        "\n[[sources]]\n"
        'kind = "folder"\nname = "outbox"\n'
        f'path = "{outbox}"\n{extra}'
        "\n[[destinations]]\n"
        'kind = "folder"\nname = "inbox"\n'
        f'path = "{inbox}"\n',
        "utf-8",
    )
    return config


def test_missing_watch_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    missing = tmp_path / "mnt" / "share" / "outbox"
    config = write_config(tmp_path, str(missing), "inbox")
    result = emix("gateway", "run", "--config", str(config), check=False, timeout=60)
    assert result.returncode == 1
    assert f"the folder {missing} of the [[sources]] 'outbox' table" in result.stderr
    assert "create = true" in result.stderr
    assert not missing.exists(), "an unmounted share must not be replaced by a local folder"


def test_missing_inbox_folder_is_refused_and_create_makes_it(tmp_path: Path) -> None:
    (tmp_path / "outbox").mkdir()
    config = write_config(tmp_path, "outbox", "no-such-inbox")
    result = emix("gateway", "status", "--config", str(config), check=False, timeout=60)
    assert result.returncode == 1
    assert "[[destinations]] 'inbox'" in result.stderr and "does not exist" in result.stderr
    text = config.read_text().replace(
        'path = "no-such-inbox"\n', 'path = "no-such-inbox"\ncreate = true\n'
    )
    config.write_text(text)
    emix("gateway", "status", "--config", str(config), check=False, timeout=60)
    assert (tmp_path / "no-such-inbox").is_dir()
