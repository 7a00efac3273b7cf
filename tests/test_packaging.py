"""What a user gets from ``pip install vtprune``: a light import, a wheel with every subpackage (the repo-root
folders ``adapters/``, ``kernels/`` and ``eval/`` mapped into ``vtprune.*``) and the ``vtprune`` command."""

from __future__ import annotations

import configparser
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("triton", "lmms_eval", "gradio", "decord", "peft", "accelerate", "optuna")


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # cwd outside the repo, so the installed package (not the source folder on sys.path[0]) is what gets imported.
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_import_is_light_and_does_not_initialise_cuda(tmp_path):
    code = f"""
import json, sys
import torch
import vtprune
snapshots = {{}}
def snapshot(label):
    snapshots[label] = {{
        "heavy": sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules),
        "cuda": torch.cuda.is_initialized(),
    }}
snapshot("import vtprune")
# Listing the registry loads every built-in pruner, adapter and the kernels package.
vtprune.list_methods()
vtprune.list_models()
import vtprune.eval, vtprune.kernels
snapshot("registry loaded")
print(json.dumps(snapshots))
"""
    result = _run([sys.executable, "-c", code], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    snapshots = json.loads(result.stdout.strip().splitlines()[-1])
    for label, seen in snapshots.items():
        assert seen["heavy"] == [], f"after {label}, these optional modules were imported: {seen['heavy']}"
        assert seen["cuda"] is False, f"after {label}, CUDA was initialised"


def test_wheel_contents(tmp_path):
    if importlib.util.find_spec("build") is None:
        pytest.fail("The 'build' package is missing; install the dev extra: pip install -e '.[dev]'.")
    outdir = tmp_path / "dist"
    # Built from a copy of the sources: setuptools reuses the checkout's build/ folder, whose stale files from an
    # earlier build would hide a package that pyproject no longer lists.
    source = tmp_path / "src"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "checkpoints"))
    result = _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir), str(source)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, (
        "python -m build --wheel --no-isolation failed (with --no-isolation every [build-system] requirement of "
        "pyproject.toml must already be installed; a missing one shows as 'Unmet dependencies'):\n"
        + result.stdout[-4000:] + result.stderr[-4000:]
    )
    wheels = list(outdir.glob("vtprune-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert len(entry_points) == 1, f"no single entry_points.txt in the wheel: {entry_points}"
        parser = configparser.ConfigParser()
        parser.read_string(wheel.read(entry_points[0]).decode())

    expected = [
        "vtprune/__init__.py",
        "vtprune/cli.py",
        "vtprune/pruners/__init__.py",
        "vtprune/adapters/__init__.py",
        "vtprune/adapters/llava.py",
        "vtprune/kernels/__init__.py",
        "vtprune/eval/__init__.py",
        "vtprune/eval/jobs/fanout.py",
        "vtprune/eval/benches/harness.py",
    ]
    # Every package folder of the source tree ships: a new subfolder missing from pyproject's `packages` would
    # import from a checkout and fail after pip install.
    for folder, package in (("vtprune", "vtprune"), ("adapters", "vtprune/adapters"), ("kernels", "vtprune/kernels"),
                            ("eval", "vtprune/eval")):
        for init in sorted((REPO_ROOT / folder).rglob("__init__.py")):
            expected.append(f"{package}/{init.relative_to(REPO_ROOT / folder).as_posix()}")
    missing = [path for path in expected if path not in names]
    assert not missing, f"the wheel lacks {missing}; it has {sorted(names)}"
    stray = [n for n in names if n.startswith(("demo/", "tests/", "vtprune/demo"))]
    assert not stray, f"the wheel ships files that are not part of the package: {stray}"
    assert parser.has_section("console_scripts"), "entry_points.txt has no [console_scripts]"
    assert parser.get("console_scripts", "vtprune", fallback=None) == "vtprune.cli:main"


def test_python_m_vtprune_help(tmp_path):
    result = _run([sys.executable, "-m", "vtprune", "--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def _imports(path) -> set[str]:
    """Every module a source file imports (``from x import y`` gives x and x.y)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_layering_engine_families_pruners():
    """The engine never imports a family or a pruner; a family sees the engine's public protocol only and never a
    pruner; a pruner never imports a family or the engine."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    public = {"vtprune.engine", "vtprune.engine.Family", "vtprune.engine.ImageLayout", "vtprune.engine.encoded_index"}
    for path in (root / "vtprune" / "engine").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("vtprune.adapters", "vtprune.pruners"))}
        assert not bad, f"{path.name} imports {bad}"
    for path in (root / "adapters").glob("*.py"):
        engine = {m for m in _imports(path) if m.startswith("vtprune.engine")}
        assert engine <= public, f"adapters/{path.name} reaches into the engine: {engine - public}"
        assert not any(m.startswith("vtprune.pruners") for m in _imports(path)), path.name
    for path in (root / "vtprune" / "pruners").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("vtprune.adapters", "vtprune.engine"))}
        assert not bad, f"pruners/{path.name} imports {bad}"
