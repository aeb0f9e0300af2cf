"""Starting FedSpa federations on Flower from Python or ``fedspa flower ...``.

``simulate``: Flower's simulation engine (Ray) in this process, one virtual SuperNode per client.
``deploy``:   real processes on loopback: a SuperLink, one SuperNode process per client (each runs its ClientApp
              in its own subprocess), and ``flwr run`` submitting the app in ``flower/``; every process is stopped
              afterwards, whatever happens.
Both write ``metrics.jsonl`` and ``summary.json`` (as ``fedspa.train`` does, plus the dropped clients) to the
output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..config import ExperimentConfig

APP_DIR = Path(__file__).resolve().parents[2] / "flower"
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def simulate(config: ExperimentConfig, output_dir: str | Path, round_timeout: float = 600.0) -> dict:
    """Runs the federation in Flower's simulation engine; returns the summary."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .server_app import run_strategy

    os.environ.update(QUIET_ENV)
    out = Path(output_dir).resolve()
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:  # noqa: ARG001
        run_strategy(grid, config, out, round_timeout)

    cpus = max(1, os.cpu_count() or 1)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "logging_level": "ERROR"}})
    return _summary(out)


def process_env(flwr_home: Path) -> dict[str, str]:
    """The environment of the Flower processes: this one, quiet, with `flwr_home` as FLWR_HOME and this
    interpreter's bin directory first on PATH (the SuperLink starts flower-superexec by name, which must resolve to
    this environment's even when it was not activated)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, *(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir)])
    return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(flwr_home), "PATH": path}


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not listen on port {port} within {timeout:.0f} s")


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def deploy(config_path: str | None, overrides: list[str], output_dir: str | Path, *,
           node_config: dict[int, str] | None = None, round_timeout: float = 120.0, timeout: float = 1800.0,
           log_dir: str | Path | None = None) -> dict:
    """Runs the federation as real processes on loopback and returns the summary.

    Args:
        config_path, overrides: the experiment, as for ``fedspa train``.
        node_config: extra ``key=value`` node config per client (e.g. ``{1: "fault='nan'"}``).
        round_timeout: how long the server waits for a round's replies.
        timeout: the whole run's limit; on expiry every process is stopped and TimeoutError raised.
        log_dir: where each process's output goes (default: ``<output_dir>/logs``).
    """
    config = ExperimentConfig.load(config_path, overrides)
    out = Path(output_dir).resolve()
    logs = Path(log_dir).resolve() if log_dir else out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    link_port, *node_ports = _free_ports(1 + config.clients)
    home = out / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n")
    env = process_env(home)
    bin_dir = Path(sys.executable).parent

    def start(name: str, args: list[str], processes: list[subprocess.Popen]) -> subprocess.Popen:
        handle = (logs / f"{name}.log").open("w")
        p = subprocess.Popen([str(bin_dir / args[0]), *args[1:]], stdout=handle, stderr=subprocess.STDOUT, env=env,
                             cwd=out, start_new_session=True)
        processes.append(p)
        (out / "process_groups.json").write_text(json.dumps([q.pid for q in processes]))
        return p

    with _processes() as processes:
        # one HTTP port serves the SuperLink's Runtime, Control and Fleet APIs; nothing is installed at run time
        link = start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                                   "--disable-runtime-dependency-installation"], processes)
        _wait_for_port(link_port, link, 60, "flower-superlink")
        for k in range(config.clients):
            extra = (node_config or {}).get(k, "")
            start(f"supernode-{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                     "--host", "127.0.0.1", "--port", str(node_ports[k]),
                                     "--node-config", f"partition-id={k} num-partitions={config.clients} {extra}"],
                  processes)
        run_config = {"output-dir": str(out), "round-timeout": float(round_timeout),
                      "config": str(Path(config_path).resolve()) if config_path else "",
                      "overrides": " ".join(shlex.quote(o) for o in overrides)}
        toml = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        app = out / "app"
        shutil.copytree(APP_DIR, app, dirs_exist_ok=True)
        runner = start("flwr-run", ["flwr", "run", str(app), "loopback", "--run-config", toml, "--stream"],
                       processes)
        deadline = time.monotonic() + timeout
        summary_path = out / "summary.json"
        while not summary_path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the federation did not finish within {timeout:.0f} s; logs in {logs}")
            if runner.poll() is not None and not summary_path.exists():
                time.sleep(2)  # the stream may end just before the ServerApp's last write
                if not summary_path.exists():
                    raise RuntimeError(f"`flwr run` ended (code {runner.returncode}) without a summary; logs in "
                                       f"{logs}:\n{(logs / 'flwr-run.log').read_text()[-3000:]}")
            time.sleep(0.5)
    return _summary(out)


def _summary(out: Path) -> dict:
    path = out / "summary.json"
    if not path.exists():
        raise RuntimeError(f"the federation wrote no {path}")
    return json.loads(path.read_text())
