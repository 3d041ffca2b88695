"""The public API: what plugins, examples and adapter tests may import, and nothing more."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import emix_core
import emix_core.testing
from tests.conftest import ROOT

ALLOWED = {"emix_core", "emix_core.testing"}


def _vendor_files() -> list[Path]:
    files = [*ROOT.glob("plugins/**/*.py"), *ROOT.glob("examples/**/*.py")]
    return sorted(f for f in files if ".venv" not in f.parts and "build" not in f.parts)


def _core_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, m) for m in modules if m.split(".")[0] == "emix_core"]
    return found


def test_plugins_and_examples_import_only_the_public_api() -> None:
    files = _vendor_files()
    assert len(files) > 20, "the adapters were not found"
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for line, module in _core_imports(path)
        if module not in ALLOWED
    ]
    assert offenders == [], "widen emix_core's public API on purpose instead:\n" + "\n".join(
        offenders
    )


def test_the_import_checker_catches_a_submodule_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from emix_core.hub import packages\nimport emix_core.crypto\n")
    assert [m for _, m in _core_imports(bad)] == ["emix_core.hub", "emix_core.crypto"]


@pytest.mark.parametrize("name", emix_core.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(emix_core, name) is not None


@pytest.mark.parametrize("name", emix_core.testing.__all__)
def test_every_testing_name_resolves(name: str) -> None:
    assert getattr(emix_core.testing, name) is not None


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = emix_core.no_such_thing  # type: ignore[attr-defined]


def test_importing_emix_core_loads_no_heavy_module() -> None:
    code = (
        "import sys, emix_core; "
        "heavy = [m for m in ('flask', 'pydicom', 'sqlalchemy', 'cryptography', 'requests') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
