"""fedspa's Flower ServerApp: runs ``FederatedStrategy`` (the server half of ``config.algorithm``) for
``config.rounds`` rounds and writes the same ``metrics.jsonl`` / ``summary.json`` as ``fedspa.train`` into
``output-dir``. The server holds no data.

Run config (``--run-config``): ``config`` (a YAML/JSON file; empty: the defaults), ``overrides`` (space-separated
``key=value``), ``output-dir``, ``round-timeout`` (seconds to wait for replies).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from ..config import ExperimentConfig
from ..train import summarize
from .strategy import FederatedStrategy

app = ServerApp()


def load_run_config(context: Context) -> tuple[ExperimentConfig, Path, float]:
    run_config = context.run_config
    path = str(run_config.get("config", "") or "") or None
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    config = ExperimentConfig.load(path, overrides)
    out = Path(str(run_config.get("output-dir", "") or "runs/flower"))
    return config, out, float(run_config.get("round-timeout", 600.0))


def run_strategy(grid: Grid, config: ExperimentConfig, out: Path, round_timeout: float) -> FederatedStrategy:
    """Runs the federation and writes its log; returns the strategy (its ``history``)."""
    strategy = FederatedStrategy(config, round_timeout=round_timeout)
    strategy.start(grid, ArrayRecord(), num_rounds=config.rounds, timeout=round_timeout)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    with (out / "metrics.jsonl").open("w") as f:
        for row in strategy.history:
            f.write(json.dumps(row) + "\n")
    summary = summarize(strategy.history, config)
    partial = out / "summary.json.partial"  # renamed when complete: the launcher polls for summary.json
    partial.write_text(json.dumps(summary, indent=2))
    partial.replace(out / "summary.json")
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, out, timeout = load_run_config(context)
    run_strategy(grid, config, out, timeout)
