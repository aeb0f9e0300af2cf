"""A FedSpa client's whole local round, three ways: measured layer choice (``fedspa.sparse_policy=fastest``, the
default), every layer sparse that fits (``memory``: the rule before measurement), and dense weights x mask
(``fedspa.execution=dense_masked``), at densities 0.5, 0.2 and 0.1, on the default CNN (Fashion-MNIST shapes,
1x28x28, width 32) and ResNet-18 (CIFAR shapes, 3x32x32), batch 32.

A round here is what ``FedSpaClient.round`` does: decode the downlink, build the model, ``local_steps`` SGD steps,
the mask update, encode the upload. Each (model, density) builds one federation (random inputs and labels; the
data do not change the time) and times rounds of the three ways interleaved, after one warm-up round each (which
also measures and caches the layer timings of the fastest policy, in a fresh cache folder). Median over rounds per
run; three runs. Each row also says how many masked layers each way runs on the sparse kernels: where the measured
choice runs none, it does exactly dense x mask's work and its ratio is 1 up to the machine's noise.

    python benchmarks/client_step.py benchmarks/results/client_step_<date>.json [--rounds 9] [--runs 3]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

WAYS = {"fastest": ["fedspa.sparse_policy=fastest"], "memory": ["fedspa.sparse_policy=memory"],
        "dense_masked": ["fedspa.execution=dense_masked"]}
MODELS = {"cnn": (["model.name=cnn", "model.width=32"], (1, 28, 28), 8),
          "resnet18": (["model.name=resnet18"], (3, 32, 32), 2)}


def _federation(model: str, density: float, way: str, samples: int):
    from fedspa.config import ExperimentConfig
    from fedspa.data import FederatedData
    from fedspa.train import federation

    overrides, shape, steps = MODELS[model]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(samples, *shape, generator=g), torch.randint(0, 10, (samples,), generator=g)
    data = FederatedData.from_tensors(train=[(x, y)] * 2, test=[(x[:8], y[:8])] * 2, num_classes=10)
    config = ExperimentConfig.load(None, [*overrides, f"fedspa.density={density}", f"local_steps={steps}",
                                          "batch_size=32", "measure_memory=false", "progress=false", "device=cpu",
                                          *WAYS[way]])
    return federation(config, data=data)


def sparse_layers(client) -> int:
    """How many layers of the client's prepared model run on the sparse kernels."""
    from fedspa.nn import SparseConv2d, SparseLinear

    model = client._executed[0]
    return sum(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())


def measure(models: list[str], densities: list[float], rounds: int) -> list[dict]:
    rows = []
    for model in models:
        for density in densities:
            feds = {way: _federation(model, density, way, 32 * MODELS[model][2]) for way in WAYS}
            downlinks = {way: fed.server.downlink(0, 0) for way, fed in feds.items()}
            for way, fed in feds.items():  # warm-up (and the fastest policy's measurements)
                fed.clients[0].round(downlinks[way], 0)
            times = {way: [] for way in WAYS}
            for r in range(rounds):
                order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
                for way in order:
                    fed = feds[way]
                    fed.clients[0].mask = None  # every round starts from the server's mask, as round 1 does
                    began = time.perf_counter()
                    fed.clients[0].round(downlinks[way], 1)
                    times[way].append(time.perf_counter() - began)
            row = {"model": model, "density": density, "local_steps": MODELS[model][2], "batch": 32,
                   **{f"{way}_s": statistics.median(t) for way, t in times.items()},
                   **{f"{way}_sparse_layers": sparse_layers(fed.clients[0]) for way, fed in feds.items()}}
            row["fastest_vs_dense_masked"] = row["dense_masked_s"] / row["fastest_s"]
            row["memory_vs_dense_masked"] = row["dense_masked_s"] / row["memory_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--densities", default="0.5,0.2,0.1")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ["FEDSPA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedspa-bench-cache-")  # measured afresh
    models, densities = args.models.split(","), [float(d) for d in args.densities.split(",")]
    runs = [measure(models, densities, args.rounds) for _ in range(args.runs)]
    import fedspa_kernels as fk

    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "fedspa_kernels": getattr(fk, "__version__", "?"), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "processor": platform.processor(), "rounds": args.rounds,
            "method": __doc__.strip()}
    Path(args.output).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"| model | density | sparse layers (fastest / memory) | dense x mask s / round | fastest s | memory s | "
          f"dense x mask / fastest (range over {args.runs} runs) | dense x mask / memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, row in enumerate(runs[0]):
        def med(key, i=i):
            return statistics.median(run[i][key] for run in runs)

        fast = [run[i]["fastest_vs_dense_masked"] for run in runs]
        mem = [run[i]["memory_vs_dense_masked"] for run in runs]
        plans = sorted({(run[i]["fastest_sparse_layers"], run[i]["memory_sparse_layers"]) for run in runs})
        print(f"| {row['model']} | {row['density']} | {', '.join(f'{a} / {b}' for a, b in plans)} | "
              f"{med('dense_masked_s'):.3f} | {med('fastest_s'):.3f} | {med('memory_s'):.3f} | "
              f"{min(fast):.2f}–{max(fast):.2f}x | {min(mem):.2f}–{max(mem):.2f}x |")


if __name__ == "__main__":
    main()
