"""Under torchrun the reason a run stopped reaches the user whichever rank failed first: each rank
leaves its exit code and message for the launcher (a real `python -m kubetune` rank process here), and
the launcher says the most telling one once — never only torchrun's "rank 1 exited with code 2"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.launch.torchrun import rank_exit
from kubetune import settings


def test_a_rank_leaves_its_reason_instead_of_racing_to_print_it(tmp_path: Path) -> None:
    env = {**os.environ, "LOCAL_RANK": "1", "RANK": "1", settings.RANK_EXITS: str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "kubetune", "train", str(tmp_path / "missing.yaml")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr == ""  # said once, by the launcher
    left = json.loads((tmp_path / "rank-1").read_text())
    assert left["code"] == 2 and "missing.yaml" in left["message"]


def test_the_launcher_says_the_most_telling_reason_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rank-0").write_text(json.dumps({"code": 1, "message": None}))  # killed by torchrun, said nothing
    (tmp_path / "rank-1").write_text(json.dumps({"code": 2, "message": "error: saved by a ddp run"}))
    (tmp_path / "rank-2").write_text("75")  # a rank of an older kubetune: a code alone
    assert rank_exit(1, tmp_path) == 2
    assert capsys.readouterr().err == "error: saved by a ddp run\n"
    (tmp_path / "rank-1").unlink()
    assert rank_exit(1, tmp_path) == 75 and capsys.readouterr().err == ""
    # the winning code said nothing (a rank killed by torchrun): another rank's reason is still shown
    (tmp_path / "rank-3").write_text(json.dumps({"code": 1, "message": "error: out of memory on rank 3"}))
    assert rank_exit(1, tmp_path) == 75 and capsys.readouterr().err == "error: out of memory on rank 3\n"
    assert rank_exit(0, tmp_path) == 0 and rank_exit(1, tmp_path / "none") == 1
