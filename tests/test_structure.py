"""Import boundaries, read from the source: the method never imports Flower, a hospital never loads the server."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import statement in ``path`` (including those inside functions)."""
    packages: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            packages.add(node.module.split(".")[0])
    return packages


@pytest.mark.parametrize("package,forbidden", [("crosssim", "flwr"), ("client", "server")])
def test_package_never_imports(package, forbidden):
    offenders = [str(path.relative_to(REPO_ROOT)) for path in sorted((REPO_ROOT / package).rglob("*.py"))
                 if forbidden in imported_packages(path)]
    assert offenders == [], f"{package}/ imports {forbidden}"


def test_a_clientapp_process_loads_no_dicom_decoder_until_a_file_misses_the_cache():
    """Flower imports client.app afresh for every message: pydicom (0.5 s) is left to a cache miss."""
    probe = "import sys, client.app; print(sorted(m for m in sys.modules if m.split('.')[0] == 'pydicom'))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert loaded.stdout.strip() == "[]"
