"""The ``fedspa`` command: ``info``, ``train``, ``compare`` and ``flower simulate|deploy``."""

from __future__ import annotations

import argparse
import json
import sys


# the overrides --help shows: a run that works as written (the test suite runs it)
HELP_EXAMPLE = "rounds=20 fedspa.density=0.2 data.dataset=digits data.samples_per_client=150"


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or JSON experiment file (default: the built-in defaults)")
    parser.add_argument("--output", help="output folder (default: <output_dir>/<UTC time>_<name>)")
    parser.add_argument("--device", help="auto (CUDA when available, the default), cpu, cuda or cuda:N; the same as "
                                         "the override device=...")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"config overrides, e.g. {HELP_EXAMPLE}")


def _seconds(summary: dict) -> str:
    """The round time: the median (the first round also measures layers and warms caches), and the total."""
    median = summary.get("median_seconds_per_round")
    if median is None:
        return "no rounds"
    return f"{median:.2f} s / round (median of {summary['rounds']}; {summary['train_seconds']:.1f} s training in all)"


def _summary_lines(summary: dict) -> list[str]:
    from .train import format_bytes

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    return [
        f"personalized accuracy (pooled): last round {summary['final_round']}: {pct(summary['final_acc_pooled'])}"
        f" (mean over clients {pct(summary['final_acc_mean'])} ± {pct(summary['final_acc_std'])}),"
        f" best round {summary['best_round']}: {pct(summary['best_acc_pooled'])}",
        f"communicated: up {format_bytes(summary['bytes_up'])}, down {format_bytes(summary['bytes_down'])}",
        f"training FLOPs: {summary['training_flops'] / 1e9:.1f} G; peak client step memory: "
        f"{format_bytes(summary['peak_client_memory'])}; {_seconds(summary)}",
        f"results: {summary['output_dir']}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedspa",
                                     description="Personalized federated learning with sparse local models")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which kernel backends are built and usable here, with versions")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")

    train = sub.add_parser("train", help="run one federated experiment")
    _add_config_arguments(train)
    replace = train.add_mutually_exclusive_group()
    replace.add_argument("--resume", action="store_true",
                         help="continue the run in --output from its checkpoint, with its config.yaml unless "
                              "--config is given (a larger rounds=N extends a finished run)")
    replace.add_argument("--overwrite", action="store_true", help="replace the run in --output (its files only)")

    compare = sub.add_parser("compare", help="several algorithms on the same partition and seeds, one table")
    _add_config_arguments(compare)
    compare.add_argument("--variants", default="fedspa,fedspa:dense_masked,fedavg",
                         help="comma-separated algorithm[:execution][+key=value...] (the overrides apply to that "
                              "variant alone, e.g. fedspa+fedspa.regrowth=gradient), or all (default: %(default)s)")
    compare.add_argument("--seeds", type=_int_list, default=[0], help="comma-separated training seeds (default: 0)")
    compare.add_argument("--target", type=float, default=None,
                         help="accuracy (0-1) for 'rounds / MB to reach' (default: 0.9 x the median of the variants' "
                              "final accuracies, rounded down to a whole percent)")
    compare.add_argument("--restart", action="store_true", help="start every run over instead of resuming")

    flower = sub.add_parser("flower", help="FedSpa on Flower: simulation engine or real processes on loopback")
    modes = flower.add_subparsers(dest="mode", required=True)
    for mode, text in (("simulate", "Flower's simulation engine (Ray), one virtual SuperNode per client"),
                       ("deploy", "a SuperLink, one SuperNode process per client and `flwr run`, on loopback")):
        parser_mode = modes.add_parser(mode, help=text)
        _add_config_arguments(parser_mode)
        parser_mode.add_argument("--round-timeout", type=float, default=120.0,
                                 help="seconds the server waits for a round's replies")
        parser_mode.add_argument("--overwrite", action="store_true", help="replace the run in --output (its files)")

    # overrides may come after options too (`train --output x rounds=5`): argparse takes one run of positionals
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        stray = [u for u in unknown if "=" not in u or u.startswith("-")] if hasattr(args, "overrides") else unknown
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*args.overrides, *unknown]
    if args.command == "info":
        import fedspa_kernels as fk

        facts = fk.system_info()
        print(json.dumps(facts, indent=2) if args.json else fk.format_system_info(facts))
        return 0

    from .config import ExperimentConfig

    if getattr(args, "device", None):
        args.overrides = [*args.overrides, f"device={args.device}"]
    try:
        if getattr(args, "resume", False) and not args.output:
            raise ValueError("--resume needs --output, the folder of the run to continue")
        config_file = args.config
        if getattr(args, "resume", False) and config_file is None:
            from pathlib import Path

            saved = Path(args.output) / "config.yaml"
            if saved.is_file():  # the run's own config (as it was run), under any overrides given now
                config_file = str(saved)
        config = ExperimentConfig.load(config_file, args.overrides)
        from .device import resolve_device

        resolve_device(config.device)  # a device that is not there is a usage error, before any work
        if args.command == "compare":
            from .compare import Variant, expand_variants

            variants = [Variant.parse(v).label for v in expand_variants(args.variants.split(",")) if v.strip()]
    except (ValueError, FileNotFoundError) as exc:
        print(f"fedspa {args.command}: {exc}", file=sys.stderr)
        return 2
    from .data import DatasetNotFoundError
    from .train import CheckpointError, RunExistsError

    try:
        if args.command == "flower":
            from pathlib import Path

            from .flower import launch
            from .train import default_output, prepare_output

            out = Path(args.output) if args.output else default_output(config, f"flower_{args.mode}")
            prepare_output(out, resume=False, overwrite=args.overwrite)
            if args.mode == "simulate":
                summary = launch.simulate(config, out, args.round_timeout)
            else:
                summary = launch.deploy(args.config, args.overrides, out, round_timeout=args.round_timeout)
            summary["output_dir"] = str(out)
            print("\n".join(_summary_lines(summary)))
            if summary.get("dropped"):
                print(f"dropped clients (round: client: reason): {json.dumps(summary['dropped'])}")
            return 0
        if args.command == "train":
            from .train import run

            result = run(config, output_dir=args.output, resume=args.resume, overwrite=args.overwrite)
            print("\n".join(_summary_lines(result.summary)))
            return 0
        from .compare import compare as run_compare

        comparison = run_compare(config, variants, args.seeds,
                                 output_dir=args.output, target_accuracy=args.target, resume=not args.restart)
    except (DatasetNotFoundError, CheckpointError, RunExistsError, ValueError, OSError) as exc:
        # ValueError: what only the run can check (the output folder, a data file, the model against the data);
        # OSError: a folder that cannot be written, a file that cannot be read
        print(f"fedspa {args.command}: {exc}", file=sys.stderr)
        return 2
    print(comparison.markdown)
    print(f"results: {comparison.output_dir}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
