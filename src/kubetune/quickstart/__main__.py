"""python -m kubetune.quickstart build-model --out DIR | make-data --out DIR"""

from __future__ import annotations

import argparse
from pathlib import Path

from kubetune.quickstart.assets import build_model, write_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.quickstart", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model", help="build the tiny Llama + tokenizer (offline, ~5 s)")
    b.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("make-data", help="write the generated quickstart chat data")
    d.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "build-model":
        build_model(args.out)
        print(f"tiny model written to {args.out}")
    else:
        write_data(args.out)
        print(f"quickstart data written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
