"""Build and install throw-away plugin distributions, exactly as a vendor's would install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def install_plugin(tmp_path: Path, name: str, code: str) -> Path:
    """pip-install a one-module plugin (entry point ``name`` in group ``emix``) into a folder.

    :return: the folder to put on ``PYTHONPATH``.
    """
    project = tmp_path / f"src-{name}"
    module = f"emix_test_{name}"
    (project / module).mkdir(parents=True)
    (project / module / "__init__.py").write_text(textwrap.dedent(code))
    (project / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "emix-test-{name}"
        version = "1.2.3"
        [project.entry-points.emix]
        {name} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
    """)
    )
    return pip_install(project, tmp_path / f"site-{name}")


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
