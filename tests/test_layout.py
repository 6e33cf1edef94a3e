"""The shape of the tree: which package may import which, no module imports a command-line entry
point, and README's Layout names every module. Read from the source (imports inside functions
count), and checked once at run time for hybrid_engine."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hybrid_engine", "rlhf", "bench")
# hybrid_engine.integrations.<framework> integrates <framework>: the one module allowed to import it
INTEGRATIONS = "hybrid_engine.integrations"
FRAMEWORKS = {p.stem for p in (ROOT / "hybrid_engine" / "integrations").glob("*.py") if p.stem != "__init__"}
# package -> the top-level packages it must never import
FORBIDDEN = {"hybrid_engine": {"rlhf", "bench", "trl"} | FRAMEWORKS, "rlhf": {"bench"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Absolute names of every module `name` imports (relative imports resolved)."""
    tree, found = ast.parse(MODULES[name].read_text()), set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return found


def is_entry_point(name: str) -> bool:
    """A module run with python -m: it has a main guard, or it is a package's __main__."""
    path = MODULES[name]
    return path.name == "__main__.py" or re.search(r"""^if __name__ == ["']__main__["']""", path.read_text(), re.M)


def forbidden(name: str) -> set[str]:
    """What module `name` must not import: its package's list, less the framework it integrates."""
    package, _, rest = name.partition(".")
    own = rest.removeprefix("integrations.") if name.startswith(INTEGRATIONS + ".") else None
    return FORBIDDEN[package] - {own}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_one_way(package):
    bad = {name: sorted(i for i in imports_of(name) if i.split(".")[0] in forbidden(name))
           for name in MODULES if name.split(".")[0] == package}
    assert not {k: v for k, v in bad.items() if v}, f"{package} imports what it must not"


def test_integrations_are_imported_only_by_their_users():
    """The rest of hybrid_engine never imports an integration (it would load its framework), and an
    integration imports no other integration."""
    assert "trl" in FRAMEWORKS
    bad = {name: sorted(i for i in imports_of(name) if i.startswith(INTEGRATIONS + ".") and i != name)
           for name in MODULES if name.startswith("hybrid_engine")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_module_imports_an_entry_point():
    entry_points = {name for name in MODULES if is_entry_point(name)}
    assert {"rlhf.ppo", "rlhf.sft", "rlhf.train", "rlhf.example.__main__", "bench.e2e"} <= entry_points
    bad = {name: sorted(imports_of(name) & entry_points) for name in MODULES}
    assert not {k: v for k, v in bad.items() if v}, "library code imports a command-line entry point"


def test_importing_hybrid_engine_loads_no_rlhf_bench_or_trl():
    code = ("import sys, hybrid_engine, hybrid_engine.engine, hybrid_engine.capability, hybrid_engine.integrations\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'rlhf', 'bench', 'trl'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"]


def readme_layout() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"^## Layout\n+```\n(.*?)^```", text, re.M | re.S).group(1)


def test_readme_layout_names_every_module():
    """Each module's (or subpackage's) name appears in the Layout lines of its package's part."""
    parts, current = {}, None
    for line in readme_layout().splitlines():
        top = re.match(r"^(\w+)/", line)
        current = top.group(1) if top else current if line.startswith(" ") else None
        if current:
            parts[current] = parts.get(current, "") + line + "\n"
    missing = []
    for name in MODULES:
        package, *rest = name.split(".")
        if rest and rest[-1] != "__main__" and not re.search(rf"\b{rest[-1]}\b", parts.get(package, "")):
            missing.append(name)
    assert not missing, f"README's Layout does not name: {missing}"
