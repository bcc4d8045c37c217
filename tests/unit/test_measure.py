"""The peak memory a training process reports is its own, not its parent's."""

from __future__ import annotations

import subprocess
import sys

from kubetune.train.measure import peak_rss_bytes


def test_a_child_of_a_large_process_reports_its_own_peak() -> None:
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touched: resident in this process
    assert peak_rss_bytes() > 600 * 2**20
    code = "from kubetune.train.measure import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    # getrusage's ru_maxrss in that child says >600 MB (the address space it replaced at exec)
    assert 0 < child < 200 * 2**20, child
    del ballast
