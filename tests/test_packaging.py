"""Packaging promises: one FAISS wheel, and a library that imports without Ray."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_dependencies_name_faiss_cpu_and_never_faiss_gpu():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps]
    assert "faiss-cpu" in names
    assert not [n for n in names if n.startswith("faiss-gpu")]


def test_faiss_cpu_beside_faiss_gpu_is_refused_with_a_fix():
    from ctsearch.cli.common import check_faiss_wheels

    check_faiss_wheels(["numpy", "faiss-cpu"])
    check_faiss_wheels(["faiss_gpu_cu12"])  # a GPU-only environment is the user's choice
    with pytest.raises(ImportError, match="faiss-cpu and faiss-gpu-cu12 are both installed.*pip uninstall"):
        check_faiss_wheels(["faiss-cpu", "faiss_gpu_cu12"])


def test_library_modules_import_without_ray():
    modules = [
        "ctsearch",
        "ctsearch.io",
        "ctsearch.hu",
        "ctsearch.config",
        "ctsearch.backbones",
        "ctsearch.preprocess",
        "ctsearch.views",
        "ctsearch.model",
        "ctsearch.ssl",
        "ctsearch.explain",
        "ctsearch.query",
        "ctsearch.report",
        "ctsearch.store",
        "ctsearch.index",
        "ctsearch.relax",
        "ctsearch.metrics",
        "ctsearch.crossexam",
        "ctsearch.prepare",
        "ctsearch.synth",
        "ctsearch.cli.main",
    ]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
