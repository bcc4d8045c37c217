"""Staging into a local folder on the cache's filesystem hard-links each file instead of copying it:
a serving pod's models volume then holds each model file once."""

from __future__ import annotations

from pathlib import Path

from kubetune.storage.stage import StageReport, copy_tree


def test_a_local_destination_gets_links_not_copies(tmp_path: Path) -> None:
    cache = tmp_path / "volume" / ".cache" / "tree"
    (cache / "sub").mkdir(parents=True)
    (cache / "model.safetensors").write_bytes(b"w" * 4096)
    (cache / "sub" / "config.json").write_text("{}")
    dest = tmp_path / "volume" / "models" / "tiny"
    report = StageReport()
    copy_tree(cache, str(dest), (), report, lambda _m: None, single=False)
    for name in ("model.safetensors", "sub/config.json"):
        assert (dest / name).stat().st_ino == (cache / name).stat().st_ino
    assert (dest / "model.safetensors").read_bytes() == b"w" * 4096 and len(report.copied) == 2
    again = StageReport()
    copy_tree(cache, str(dest), (), again, lambda _m: None, single=False)
    assert len(again.skipped) == 2 and not again.copied  # already there: nothing done twice
