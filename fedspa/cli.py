"""The ``fedspa`` command."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedspa", description="Personalized federated learning with sparse local models")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which kernel backends are built and usable here, with versions")
    info.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    if args.command == "info":
        import fedspa_kernels as fk

        facts = fk.system_info()
        print(json.dumps(facts, indent=2) if args.json else fk.format_system_info(facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
