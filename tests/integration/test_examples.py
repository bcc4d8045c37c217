"""Every example spec (workflows A–D) runs here at tiny scale: the same file, with `--set`
overrides of model, data, device and steps only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, run_kubetune, tiny_overrides

pytestmark = pytest.mark.integration
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if p.name != "quickstart.yaml")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_trains_at_tiny_scale(example: Path, tmp_path: Path, tiny_model: Path) -> None:
    sets = tiny_overrides(tmp_path / "run")
    if "type: qlora" in example.read_text():
        sets.append("method.type=lora")  # qlora needs a CUDA GPU; everything else is the example's
    args = ["train", str(example)]
    for item in sets:
        args += ["--set", item]
    res = run_kubetune(*args, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "step 3/3" in res.stdout and "done: 3 steps" in res.stdout
    final = tmp_path / "run" / "final"
    assert (final / "COMPLETE").exists()
    assert (final / ("merged" if "type: full" in example.read_text() else "adapter") / "chat_template.jinja").exists()
