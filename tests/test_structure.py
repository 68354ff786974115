"""The folder listing is the design: the library (per-shard math, kernels and their build, communication,
functional core, cells, options, registry, config) never imports the tools that sit beside it (launcher,
training job, benchmark, integrations, command line). Checked on the source, statically, and by importing."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mf_loss

pytestmark = pytest.mark.unit

PACKAGE = Path(mf_loss.__file__).resolve().parent
TOOLS = ("launch", "train", "bench", "integrations", "cli")
LIBRARY = ("__init__.py", "functional.py", "options.py", "registry.py", "config_loader.py", "ops", "kernels",
           "parallel", "nn")


def _modules_imported_by(path: Path, package_parts):
    """Absolute names of the mf_loss modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names += [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif node.module:
                names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in names if name == "mf_loss" or name.startswith("mf_loss.")]


def _library_files():
    for entry in LIBRARY:
        path = PACKAGE / entry
        if path.is_dir():
            yield from sorted(path.rglob("*.py"))
        elif path.exists():
            yield path


def test_every_top_level_entry_is_library_or_tool():
    entries = {p.name for p in PACKAGE.iterdir()
               if p.name not in ("__pycache__", "data") and not p.name.endswith(".egg-info")}
    known = set(LIBRARY) | {t if t != "cli" else "cli.py" for t in TOOLS}
    assert entries <= known, f"unclassified entries in mf_loss/: {sorted(entries - known)}"


def test_the_library_never_imports_a_tool():
    offenders = []
    for path in _library_files():
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        package_parts = list(relative.parts)[:-1]  # the package a relative import starts from
        for name in _modules_imported_by(path, package_parts):
            second = name.split(".")[1] if "." in name else ""
            if second in TOOLS:
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert offenders == []


def test_importing_the_library_loads_no_tool_and_no_mindformers():
    script = ("import sys, mf_loss, mf_loss.functional, mf_loss.config_loader; "
              "tools = sorted(m for m in sys.modules if m.split('.')[:2][-1] in "
              f"{TOOLS!r} and m.startswith('mf_loss.')); "
              "print(tools, 'mindformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] False"


def test_every_module_opens_with_what_it_is_for():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("*.py"))
               if "__pycache__" not in p.parts and ast.get_docstring(ast.parse(p.read_text())) is None
               and p.name not in ("__main__.py",) and p.read_text().strip()]
    assert missing == []


def test_every_public_name_has_a_docstring():
    missing = [name for name in mf_loss.__all__ if not (getattr(getattr(mf_loss, name), "__doc__", None) or "").strip()]
    assert missing == []
