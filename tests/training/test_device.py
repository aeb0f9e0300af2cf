"""The device setting: resolution, clear errors, and proof that every tensor a run creates is put on the run's
device explicitly (under a "meta" default device, a tensor created without one cannot meet the real ones)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedspa.algorithms import names
from fedspa.cli import main
from fedspa.config import ExperimentConfig
from fedspa.data import federated_data
from fedspa.device import resolve_device
from fedspa.train import load_checkpoint, read_checkpoint, run

TINY = ["data.dataset=digits", "data.samples_per_client=120", "clients=3", "client_fraction=1.0", "model.name=cnn",
        "model.width=4", "fedspa.density=0.3", "rounds=2", "local_steps=2", "batch_size=16", "progress=false",
        "sub_fedavg.prune_rate=0.3"]
VARIANTS = [(a, ()) for a in names()] + [("fedspa", ("fedspa.regrowth=random",)),
                                         ("fedspa", ("fedspa.regrown_init=zero", "fedspa.aggregation=mean")),
                                         ("fedspa", ("fedspa.execution=dense_masked", "norm_layers=local")),
                                         ("fedspa", ("fedspa.mask_scope=shared", "fedspa.regrowth=random",
                                                     "fedspa.personal_head=true")),
                                         ("fedavg", ("norm_layers=local",))]


def test_auto_is_the_cpu_here_and_bad_settings_are_clear_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device=cuda: no CUDA device is visible"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="device=cuda:1: no CUDA device is visible"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        ExperimentConfig.load(None, ["device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is visible")
def test_the_cli_refuses_a_missing_gpu_before_any_work(tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path), "--device", "cuda", *TINY]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("algorithm,extra", VARIANTS, ids=[" ".join((a, *e)) for a, e in VARIANTS])
def test_every_tensor_of_a_run_is_created_on_its_device(tmp_path, algorithm, extra):
    config = ExperimentConfig.load(None, TINY + [f"algorithm={algorithm}", "device=cpu", *extra])
    data = federated_data(config.data, config.clients)  # the user's data, made before
    reference = run(config, data=data, output_dir=tmp_path / "plain")
    with torch.device("meta"):  # a factory call without a device now makes a meta tensor, which fails on use
        checked = run(config, data=data, output_dir=tmp_path / "checked")
    drop = {"train_seconds", "eval_seconds", "peak_memory"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in checked.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in reference.history]


def test_a_checkpoint_resumes_on_any_device(tmp_path):
    """Checkpoints are written from the run's device and read onto the CPU first; the device is not part of what
    a run computes, so a run may resume elsewhere."""
    config = ExperimentConfig.load(None, TINY + ["device=cpu", "rounds=3"])
    full = run(config, output_dir=tmp_path / "full")
    run(config, output_dir=tmp_path / "moved", stop_after=1)
    elsewhere = ExperimentConfig.load(None, TINY + ["device=auto", "rounds=3"])
    assert load_checkpoint(tmp_path / "moved" / "checkpoint.pt", elsewhere)["round"] == 1
    resumed = run(elsewhere, output_dir=tmp_path / "moved", resume=True)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])
    saved = read_checkpoint(tmp_path / "moved" / "checkpoint.pt")
    assert all(t.device.type == "cpu" for t in saved["server"]["global"].values())


_HELD = """
import ctypes, sys, torch
if sys.argv[1] == "keep":
    from fedspa.device import keep_freed_memory
    assert keep_freed_memory()
x = torch.ones(40 << 20, dtype=torch.uint8)  # 40 MB: above glibc's largest dynamic mmap threshold (32 MB)
del x


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
print(mallinfo2().fordblks)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc on Linux")
def test_keep_freed_memory_keeps_a_freed_large_block_for_reuse():
    """After a 40 MB tensor is freed, malloc's free memory (mallinfo2().fordblks): without the setting the block was
    mmapped and went back to the OS (little is held); with it, the block stays in the heap for the next allocation.
    (Whether its pages stay resident is the kernel's choice: counting page faults on reuse was seen to vary.)"""
    held = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", _HELD, mode], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        held[mode] = int(done.stdout.strip().splitlines()[-1])
    assert held["default"] < 20 << 20, held
    assert held["keep"] >= 40 << 20, held


def test_run_applies_keep_freed_memory_unless_turned_off(tmp_path, monkeypatch):
    import fedspa.train as train_module

    calls = []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: calls.append(1) or True)
    tiny = TINY + ["rounds=1", "local_steps=1", "measure_memory=false"]
    run(ExperimentConfig.load(None, tiny), output_dir=tmp_path / "on")
    assert calls == [1]
    run(ExperimentConfig.load(None, tiny + ["keep_freed_memory=false"]), output_dir=tmp_path / "off")
    assert calls == [1]
