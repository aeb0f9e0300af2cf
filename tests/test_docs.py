"""The documentation's examples run as written: every Python block of docs/training.md, and every README block
marked ``<!-- tested -->``, executed in order in a fresh process (so registrations do not leak into other tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _blocks(path: Path, marked_only: bool) -> list[str]:
    text = path.read_text()
    pattern = r"<!-- tested -->\n```python\n(.*?)```" if marked_only else r"```python\n(.*?)```"
    return re.findall(pattern, text, re.S)


@pytest.mark.parametrize("doc,marked_only", [("docs/training.md", False), ("README.md", True)])
def test_the_examples_run_as_written(tmp_path, doc, marked_only):
    blocks = _blocks(REPO / doc, marked_only)
    assert blocks, f"{doc} has no example to run"
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # they run from the repository root
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(blocks))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, f"{doc} examples failed:\n{done.stdout}\n{done.stderr}"
