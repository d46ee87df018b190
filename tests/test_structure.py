"""The shape ARCHITECTURE.md promises, checked on the source text (no imports, < 1 s): short functions, imports at
the top of files, one module owning storage. `lint-imports` (pyproject.toml's contracts) checks the layers."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("clipdense", "bench") for p in (ROOT / d).rglob("*.py"))
MAX_FUNCTION_LINES = 60
MAX_LOCAL_IMPORTS = 10


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _functions(tree: ast.Module):
    return (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _is_project_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] in ("clipdense", "bench")
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] in ("clipdense", "bench") for a in node.names)
    return False


def local_imports() -> list[tuple[Path, ast.stmt]]:
    """Project imports made inside a function body (each hides an arrow of the module graph)."""
    found = {}
    for path in SOURCES:
        for fn in _functions(_tree(path)):
            for node in ast.walk(fn):
                if _is_project_import(node):
                    found[(path, node.lineno)] = node
    return [(path, node) for (path, _), node in sorted(found.items())]


def test_no_function_is_longer_than_60_lines():
    long = [f"{p.relative_to(ROOT)}:{fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for p in SOURCES for fn in _functions(_tree(p)) if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these functions: " + ", ".join(long)


def test_project_imports_sit_at_the_top_of_files_with_few_explained_exceptions():
    found = local_imports()
    assert len(found) <= MAX_LOCAL_IMPORTS, "imports inside functions: " + ", ".join(
        f"{p.relative_to(ROOT)}:{n.lineno}" for p, n in found)
    for path, node in found:
        lines = path.read_text().splitlines()
        said = " ".join(lines[max(0, node.lineno - 3):node.end_lineno])
        assert "#" in said, f"{path.relative_to(ROOT)}:{node.lineno}: say in a comment why this import is local"


def test_storage_is_built_in_one_module():
    """Filesystems are built and the endpoint key named only in data/storage.py (config sections inherit it)."""
    named = {p.relative_to(ROOT).as_posix() for p in SOURCES if p.parts[-3:-1] != ("tests",)
             and p.is_relative_to(ROOT / "clipdense") and re.search(r"\bs3_endpoint\b", p.read_text())}
    builds = {p.relative_to(ROOT).as_posix() for p in SOURCES
              if re.search(r"\b(S3FileSystem|LocalFileSystem|filesystem_for)\(", p.read_text())}
    assert named <= {"clipdense/data/storage.py"}, f"s3_endpoint named outside data/storage.py: {sorted(named)}"
    assert builds <= {"clipdense/data/storage.py"}, f"filesystems built outside data/storage.py: {sorted(builds)}"


def test_the_guard_sees_a_long_function_and_a_local_import(tmp_path):
    """The checks above are not vacuous: they catch what they look for."""
    src = "def f():\n    from clipdense.config import Config\n" + "    x = 1\n" * 60
    tree = ast.parse(src)
    fn = next(_functions(tree))
    assert fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES
    assert any(_is_project_import(n) for n in ast.walk(fn))
