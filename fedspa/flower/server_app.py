"""fedspa's Flower ServerApp: runs ``FederatedStrategy`` (the server half of ``config.algorithm``) for
``config.rounds`` rounds and writes the same files as ``fedspa.train`` (but the checkpoint) into ``output-dir``. The server holds no data.

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
from ..train import TensorBoardLog, run_log, write_outputs
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
    """Runs the federation and writes what ``fedspa.train`` writes (``config.yaml``, ``metrics.jsonl``,
    ``metrics.csv``, ``run.log``, the plots, ``summary.json`` last); returns the strategy (its ``history``)."""
    out.mkdir(parents=True, exist_ok=True)
    with run_log(out):
        strategy = FederatedStrategy(config, round_timeout=round_timeout)
        strategy.start(grid, ArrayRecord(), num_rounds=config.rounds, timeout=round_timeout)
        config.save(out / "config.yaml")
        history = [{k: v for k, v in row.items() if k != "started"} for row in strategy.history]
        with (out / "metrics.jsonl").open("w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        board = TensorBoardLog(out, config.tensorboard)
        for row in history:
            board.add(row)
        board.close()
        write_outputs(history, config, out)  # summary.json last and whole: the launcher polls for it
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, out, timeout = load_run_config(context)
    run_strategy(grid, config, out, timeout)
