"""Count the imports placed inside function bodies, edgeprune's own apart from the others.

The import-linter contracts (pyproject.toml) forbid an import that goes up a layer wherever it
stands; this script shows how many imports still hide inside functions (each should say why:
start-up time, an optional dependency). ``--list`` prints every one with its file and line.

    python scripts/function_imports.py [--list] [PACKAGE_DIR]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def function_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, edgeprune's own) of every import inside a function of the file at ``path``."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                relative = isinstance(child, ast.ImportFrom) and child.level > 0
                module = child.module if isinstance(child, ast.ImportFrom) else child.names[0].name
                found.append(
                    (child.lineno, "." * getattr(child, "level", 0) + (module or ""), relative or (module or "").startswith("edgeprune"))
                )
            visit(child, in_function or isinstance(child, FUNCTIONS))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "edgeprune")
    parser.add_argument("--list", action="store_true", help="print every function-level import")
    args = parser.parse_args()
    rows = [(path, *row) for path in sorted(args.package.rglob("*.py")) for row in function_imports(path)]
    if args.list:
        for path, line, module, own in rows:
            print(f"{path.relative_to(args.package.parent)}:{line} {'edgeprune' if own else 'other'} {module}")
    own = sum(1 for *_, is_own in rows if is_own)
    print(f"function-level imports: {len(rows)} (edgeprune's own: {own}, other: {len(rows) - own})")


if __name__ == "__main__":
    main()
