"""The installed package stands alone: a built wheel carries its presets, and the library imports no experiment."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "platform" / "histodiff"


def test_no_library_module_imports_the_benchmarks_or_the_tests():
    outside = {"bench", "tests", "toys", "conftest"}
    offenders = []
    for path in sorted(LIBRARY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in outside]
    assert not offenders, offenders


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_a_non_editable_install_runs_ingest_with_a_preset_from_another_folder(builtin_data, tmp_path):
    # Build from a copy, so the checkout gets no build/ folder; offline, with the venv's setuptools.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "platform", src / "platform", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path / "whl"), str(src),
         cwd=tmp_path)
    (wheel,) = (tmp_path / "whl").glob("histodiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"histodiff/presets/tiny.yaml", "histodiff/presets/paper.yaml", "histodiff/presets/expected/tiny.yaml",
            "histodiff/presets/expected/paper.yaml"} <= set(names)
    assert all(n.startswith(("histodiff/", "histodiff-")) for n in names), "the wheel ships only the package"
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=tmp_path)

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    # The installed package first, the environment's dependencies after it; never the checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "RAY_TMPDIR": tempfile.mkdtemp(prefix="hdray-", dir="/tmp")}

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=run_dir, env=env, capture_output=True, text=True,
                              timeout=600)

    try:
        where = python("-c", "import histodiff; print(histodiff.__file__)")
        assert where.returncode == 0 and where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
        out = tmp_path / "out"
        ingest = python("-m", "histodiff.cli", "run", "ingest", "--config", "tiny", f"paths.root={out}",
                        "paths.unlabeled_sources=[]", f"paths.labeled_source={builtin_data['labeled_test']}",
                        "paths.labeled_test_source=null", "tracking.enabled=false")
        assert ingest.returncode == 0, ingest.stdout[-2000:] + ingest.stderr[-3000:]
        assert json.loads((out / "shards" / "labeled" / "_manifest.json").read_text())["num_tiles"] > 0
        bench = python("-m", "histodiff.cli", "bench")
        assert bench.returncode == 2 and "from a histodiff checkout" in bench.stderr, bench.stderr[-2000:]
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
