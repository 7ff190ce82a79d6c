"""The house rules that are checked rather than remembered: the import-linter contracts in
pyproject.toml (layers, a pure model, a ground floor without heavy libraries), and no private
name imported from another module."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("typedconfig", "storage", "model", "davis", "pipeline", "jobs", "bench")
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: grimp imports the packages under `root`, not the installed ones.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_are_kept():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_an_upward_or_forbidden_import_breaks_a_contract(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "pipeline" / "upward.py").write_text("from jobs import train\n")
    (tmp_path / "model" / "files.py").write_text("import fsspec\nimport ray\n")
    done = _lint(tmp_path)
    assert done.returncode == 1
    assert "Contracts: 1 kept, 2 broken." in done.stdout
    assert "pipeline.upward -> jobs.train" in done.stdout
    assert "model is not allowed to import fsspec" in done.stdout
    assert "model is not allowed to import ray" in done.stdout


def test_no_private_name_is_imported_from_another_module():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and not node.level:
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    if private and not (node.module or "").startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}: {node.module} {private}")
    assert found == []
