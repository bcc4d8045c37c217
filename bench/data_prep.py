"""Data preparation: cold (read, check, render, tokenise, mask) vs cached, on 100k chat rows.

    python bench/data_prep.py [--rows 100000]

Both runs go through `kubetune.data.prepare.prepare` — the same call `validate`, `plan` and `train`
make — with an empty cache first, then with the entry the first run wrote. Target: cached <= 5% of cold.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from kubetune.quickstart.assets import make_rows

    rows = make_rows(n, seed)
    rng = random.Random(seed)
    with path.open("w") as fh:
        for row in rows:
            if rng.random() < 0.2:  # some longer, multi-turn conversations
                row["messages"] += make_rows(1, rng.randrange(10**9))[0]["messages"][-2:]
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-prep-"))
    os.environ["KUBETUNE_CACHE"] = str(work / "cache")
    data = work / "chat.jsonl"
    write_rows(data, args.rows)

    from kubetune.quickstart.assets import build_model
    from kubetune.spec import validate_spec

    model = ROOT / "examples" / "assets" / "tiny-llama"
    if not (model / "config.json").exists():
        build_model(model)
    from kubetune.data.prepare import prepare

    spec = validate_spec({"name": "prep", "model": {"base": str(model)},
                          "data": {"train": str(data), "max_length": 256}})
    t = time.perf_counter()
    cold = prepare(spec)
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = prepare(spec)
    warm_s = time.perf_counter() - t
    assert warm.cached and not cold.cached
    assert len(warm.train.rows) == len(cold.train.rows)
    assert all(list(a.input_ids) == list(b.input_ids) and list(a.labels) == list(b.labels)
               for a, b in zip(cold.train.rows[:1000], warm.train.rows[:1000]))
    tokens = sum(len(r.input_ids) for r in cold.train.rows)
    print(f"{args.rows} rows, {tokens} tokens, {os.cpu_count()} CPU cores")
    print(f"cold:   {cold_s:7.2f} s  ({args.rows / cold_s:,.0f} rows/s)")
    print(f"cached: {warm_s:7.2f} s")
    print(f"cached/cold: {100 * warm_s / cold_s:.1f}%  (target <= 5%)")


if __name__ == "__main__":
    main()
