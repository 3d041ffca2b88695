"""Throw-away plugin distributions, installed as a vendor's users would install them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def install_plugin(tmp_path: Path, name: str, code: str) -> Path:
    """Install a one-module plugin (entry point ``name`` in group ``emix``) into a folder,
    laid out as ``pip install --target`` lays it out: the module and a ``.dist-info`` with
    its entry points (written directly: a pip run and a setuptools build only cost time
    here; :func:`pip_install` proves the real install of the example plugin).

    :return: the folder to put on ``PYTHONPATH``.
    """
    target = tmp_path / f"site-{name}"
    module = f"emix_test_{name}"
    (target / module).mkdir(parents=True)
    (target / module / "__init__.py").write_text(textwrap.dedent(code))
    info = target / f"emix_test_{name}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: emix-test-{name}\nVersion: 1.2.3\n"
    )
    (info / "entry_points.txt").write_text(f"[emix]\n{name} = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    return target


def pip_install(project: Path, target: Path) -> Path:
    """``pip install --target`` a plugin project, as a vendor's users would install it."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(project),
        ],
        check=True,
        capture_output=True,
    )
    return target
