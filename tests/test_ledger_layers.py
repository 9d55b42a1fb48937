"""The arrows between the package's folders point down (README "Architecture"): no module imports, even lazily
inside a function, from a folder above its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import addon

PACKAGE = Path(addon.__file__).parent
FOLDERS = ("metering", "store", "ledger", "proxy", "datasette", "tools")
# What each folder must never import.
FORBIDDEN = {
    "metering": {"store", "ledger", "proxy", "datasette", "tools"},
    "store": {"ledger", "proxy", "datasette", "tools"},
    "ledger": {"proxy", "datasette", "tools"},
    "proxy": {"datasette", "tools"},
    "datasette": {"proxy", "tools"},
}


def imported_folders(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "addon" and len(parts) > 1 and parts[1] in FOLDERS:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_import_points_up(folder):
    modules = sorted((PACKAGE / folder).glob("*.py"))
    assert modules
    wrong = {str(path.relative_to(PACKAGE)): sorted(imported_folders(path) & FORBIDDEN[folder]) for path in modules}
    assert {name: up for name, up in wrong.items() if up} == {}


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from addon.tools import reconcile\n    import addon.proxy.limits\n")
    assert imported_folders(module) == {"tools", "proxy"}
