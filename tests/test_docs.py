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


TINY = ["data.dataset=digits", "data.samples_per_client=50", "clients=4", "model.name=mlp", "model.width=4",
        "rounds=1", "progress=false", "measure_memory=false"]


def _commands(path: Path) -> list[str]:
    """The `fedspa ...` lines of every bash block of `path`, without their comments."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("fedspa ")]
    return lines


def test_the_readme_commands_run_as_written(tmp_path):
    """Every `fedspa` command of the README, as written, with tiny settings appended (later overrides win; a
    second --seeds keeps a comparison to one seed) and its runs folder in a temporary place."""
    commands = _commands(REPO / "README.md")
    assert any("--resume" in c for c in commands) and any(c.startswith("fedspa flower") for c in commands)
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    for command in commands:
        args = command.split()[1:]
        extra = TINY + (["--seeds", "0"] if args[0] == "compare" else [])
        if "--resume" in args:  # it continues the run the line before wrote: its own config, one round more
            extra = ["rounds=2"]
        elif "--output" not in args and args[0] != "flower":
            args += ["--output", f"runs/{args[0]}"]
        if args[0] == "flower":
            args += ["--output", "runs/flower"]
        done = subprocess.run([sys.executable, "-m", "fedspa.cli", *args, *extra], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _table_rows(text: str) -> list[str]:
    """The body rows of every markdown table whose header starts ``| variant |``."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("| variant |"):
            inside = True
        elif not line.startswith("|"):
            inside = False
        elif inside and not line.startswith("| ---"):
            rows.append(line.strip())
    return rows


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md"])
def test_every_result_row_quoted_is_a_committed_row(doc):
    """A variant row in the documentation is copied, character for character, from a committed comparison table
    (benchmarks/results/**/comparison.md): its numbers are the numbers."""
    committed = set()
    for table in (REPO / "benchmarks" / "results").rglob("comparison.md"):
        committed.update(_table_rows(table.read_text()))
    quoted = _table_rows((REPO / doc).read_text())
    assert quoted or doc != "README.md", "the README quotes no result table"
    missing = [row for row in quoted if row not in committed]
    assert not missing, f"{doc} rows found in no committed comparison.md:\n" + "\n".join(missing)
