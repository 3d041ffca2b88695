"""The command line starts fast: ``emix --version`` and ``emix --help`` import neither the
hub nor DICOM, crypto, database or HTTP libraries.

Checked with ``python -X importtime`` in a child process (which modules were imported),
not with a stopwatch, so that a busy machine cannot make the test fail or pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

#: Libraries a command may need, never the start-up: each costs tens to hundreds of ms.
HEAVY = (
    "pydicom",
    "pynetdicom",
    "cryptography",
    "flask",
    "werkzeug",
    "sqlalchemy",
    "requests",
    "urllib3",
    "dicomweb_client",
    "numpy",
    "lxml",
    "fhir",
    "hl7apy",
    "fpdf",
    "rich",
    "gunicorn",
    "boto3",
    "psycopg",
)


def imported_modules(*args: str) -> tuple[set[str], str]:
    """Top-level names of every module imported by ``emix ARGS``, and its output."""
    env = {k: v for k, v in os.environ.items() if k != "EMIX_DISABLED_PLUGINS"}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "emix_core", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    assert "emix_core" in names  # the child did report its imports
    return names, done.stdout


def test_version_imports_no_heavy_library():
    names, out = imported_modules("--version")
    assert out.startswith("emix, version ")
    assert sorted(names & set(HEAVY)) == []
    # nor any plugin: the version needs no entry point
    assert sorted(n for n in names if n.startswith("emix_") and n != "emix_core") == []


def test_help_lists_core_and_plugin_commands_without_importing_heavy_libraries():
    names, out = imported_modules("--help")
    listing = out.split("Commands:")[1]
    commands = set(re.findall(r"^  (\S+) ", listing, flags=re.MULTILINE))
    assert {"send", "receive", "hub", "report", "demo", "gateway", "doctor"} <= commands
    # commands added by the installed adapters, through emix_register_commands
    assert {"dimse", "dicomweb", "cd"} <= commands
    assert sorted(names & set(HEAVY)) == []


@pytest.mark.parametrize("command", ["hub", "report", "dimse"])
def test_a_group_help_is_still_there(command):
    names, out = imported_modules(command, "--help")
    assert "Usage: emix " + command in out
