"""``python -m fedspa_kernels [--json]``: which backends are built and usable here, with versions."""

from __future__ import annotations

import argparse
import json

from . import format_system_info, system_info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedspa_kernels", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    info = system_info()
    print(json.dumps(info, indent=2) if args.json else format_system_info(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
