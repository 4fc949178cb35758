"""Import boundaries, read from the source: the method never imports Flower, a hospital never loads the server."""

import ast
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
