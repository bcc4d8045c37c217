"""The migration guide's program, taken from docs/migrating-from-openai.md as written, runs against a
real `kubetune server` with only its base URL, key and base model given."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART_DATA, ROOT
from tests.integration.test_control import MODEL, Control

pytestmark = pytest.mark.integration

KEY = "kt-migration-guide-key-0123456789abcdef"


def test_the_guides_openai_program_runs_unchanged(tmp_path: Path, tiny_model: Path) -> None:
    guide = (ROOT / "docs" / "migrating-from-openai.md").read_text()
    program = re.search(r"## The program.*?```python\n(.*?)```", guide, re.S)
    assert program, "the guide's program block"
    script = tmp_path / "program.py"
    script.write_text(program.group(1))
    server = Control(tmp_path / "home", "--api-key", KEY).start()
    try:
        env = {"KUBETUNE_URL": server.url, "KUBETUNE_API_KEY": KEY, "BASE_MODEL": MODEL,
               "DATA": str(QUICKSTART_DATA), "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)
    finally:
        server.stop()
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"^model ft:tiny-llama:support:[0-9a-f]{8} trained tokens \d+$", out, re.M), out
    assert "The job has successfully completed" in out and "Step " in out
    assert re.search(r"^checkpoint ft:tiny-llama:support:[0-9a-f]{8}:ckpt-step-\d+ train loss [0-9.]+", out, re.M)
    steps = re.search(r"^result file: (\d+) steps; last train loss ([0-9.]+)$", out, re.M)
    assert steps and int(steps.group(1)) >= 2, out
    assert re.search(r"^answer: .+", out, re.M)
