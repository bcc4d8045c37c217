"""`python -m kubetune.storage.probe --read URI ... --write URI`: the storage checks of `kubetune
doctor --probe`, run inside the cluster under the run's identity. One JSON line per URI
({"uri", "access", "ok", "message"}) for the doctor to read from the pod's log; exit 0 when every
check passes, 2 when one does not."""

from __future__ import annotations

import argparse
import json
import sys

from kubetune.errors import KubetuneError


def check(uri: str, access: str) -> dict[str, object]:
    from kubetune.storage.store import Store

    try:
        store = Store(uri)
        if access == "read":
            store.check_readable("input")
        else:
            store.check_writable("output")
    except KubetuneError as exc:
        return {"uri": uri, "access": access, "ok": False, "message": exc.message, "hint": exc.hint or ""}
    return {"uri": uri, "access": access, "ok": True, "message": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.storage.probe", description=__doc__)
    parser.add_argument("--read", action="append", default=[], metavar="URI")
    parser.add_argument("--write", action="append", default=[], metavar="URI")
    args = parser.parse_args(argv)
    results = [check(u, "read") for u in args.read] + [check(u, "write") for u in args.write]
    for result in results:
        print(json.dumps(result), flush=True)
    return 0 if all(r["ok"] for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
