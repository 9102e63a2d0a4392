"""The package's layers read one way (issue 29), checked from every module's imports (ast, the
function-level ones too): models/ and data/ at the bottom, then trainer/ and evaluation/, then export/,
then bench/ (which drives them all), then scripts/ and launch.py at the top, which nothing imports;
no import circles between modules; tests import the package, never a script (checked here from
their source, and by conftest at the end of every session from what was really imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "data", "trainer", "evaluation", "export", "bench", "scripts")
TOP = ("bench", "scripts", "launch")
# what each layer may not import (anything above it)
FORBIDDEN = {
    "models": ("data", "trainer", "evaluation", "export", *TOP),
    "data": ("models", "trainer", "evaluation", "export", *TOP),
    "trainer": ("export", *TOP),
    "evaluation": ("trainer", "export", *TOP),
    "export": TOP,
    "bench": ("scripts", "launch"),
    "scripts": ("scripts", "launch"),  # a script is a command line over the package, never a library
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    found["launch"] = ROOT / "launch.py"
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports, by their full names (`from a.b import c` is a.b.c where
    that is a module, else a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known or m.split(".")[0] in ("scripts",)}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, name, known) - {name} for name, path in mods.items()}


def test_each_layer_imports_only_below_it():
    wrong = [f"{m} imports {i}" for m, deps in graph().items() for i in deps
             if i.split(".")[0] in FORBIDDEN.get(m.split(".")[0], ())]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_tests_never_import_a_script():
    """By name, by path (a `scripts` folder put on sys.path, then a bare import) or by file."""
    wrong = []
    for p in (ROOT / "tests").rglob("*.py"):
        source = p.read_text()
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{p.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "scripts"]
            called = node.func if isinstance(node, ast.Call) else None
            name = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", "")
            if name in ("spec_from_file_location", "run_path", "import_module", "insert", "append"):
                text = ast.get_source_segment(source, node) or ""
                if name in ("spec_from_file_location", "run_path") or "scripts" in text and (
                        name == "import_module" or "sys.path" in text):
                    wrong.append(f"{p.relative_to(ROOT)}:{node.lineno}: {text[:80]}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_can_be_imported_first():
    """Each package module imported first, with no project module loaded before it: an import circle
    through the method registry (trainer/methods/__init__.py imports every method module by name, which
    ast does not see) fails only for the module that starts it (trainer.weights did, via finetune)."""
    import subprocess
    import sys

    names = sorted(m for m in modules() if m.split(".")[0] in ("models", "data", "trainer", "evaluation", "export",
                                                                  "bench"))
    code = f"""
import importlib, sys
roots = {PACKAGES!r}
failed = []
for name in {names!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in roots]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
for line in failed:
    print("FAILED", line)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    failed = [line for line in p.stdout.splitlines() if line.startswith("FAILED")]
    assert not failed, "\n".join(failed)
