"""The kernel package's structure: no import circle (lazy imports inside functions included), every op declared
through the one descriptor, and a warning when the native kernels do not load."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import torch

import fedspa_kernels as fk

PACKAGE = Path(fk.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every fedspa_kernels module `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m.startswith("fedspa_kernels") and m != name}


def test_no_import_circle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path, name) if m in modules} for name, path in modules.items()}
    # a package's __init__ importing its submodules is not a circle back into them
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and modules[m].name == "__init__.py")}
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        visiting.add(node)
        for nxt in graph[node]:
            if nxt in visiting:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, trail + [nxt])
        visiting.discard(node)
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, cycles


def test_triton_kernels_never_import_the_op_modules():
    for path in (PACKAGE / "triton_kernels").glob("*.py"):
        imported = _imports(path, _module_name(path))
        assert not any(m.startswith("fedspa_kernels.ops") for m in imported), (path.name, imported)


def test_every_kernel_op_has_its_twins_and_fake():
    for name in ("spmm", "spmm_transposed", "sddmm", "sparse_conv2d", "sparse_conv2d_input_grad",
                 "sparse_conv2d_weight_grad", "prune_regrow", "scatter_add_aggregate", "scatter_add_average",
                 "transpose_copy"):
        for twin in (name, name + "_reference", name + "_triton"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fedspa::{twin}", "Meta") or \
                torch._C._dispatch_has_kernel(f"fedspa::{twin}"), twin


def test_a_failed_extension_load_warns_once_with_the_fix():
    code = ("import logging, sys\nlogging.basicConfig(stream=sys.stdout)\n"
            "import fedspa_kernels as fk\nimport fedspa_kernels._extension as e\n"
            "print('loaded', e.STATE.loaded)")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    broken = subprocess.run([sys.executable, "-c", "import sys; sys.modules['fedspa_kernels._C'] = None\n" + code],
                            capture_output=True, text=True, env=env, timeout=300)
    assert broken.returncode == 0, broken.stderr
    lines = [line for line in broken.stdout.splitlines() if "native kernels did not load" in line]
    assert len(lines) == 1 and "pip install --no-build-isolation -e ." in lines[0] and "loaded False" in broken.stdout
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**env, "FEDSPA_DISABLE_EXTENSION": "1"})
    assert "did not load" not in quiet.stdout and "loaded False" in quiet.stdout
