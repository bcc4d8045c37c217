"""The encoded-data cache: a hit returns identical rows; any change to the data or settings misses."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.data.prepare import prepare
from kubetune.spec import validate_spec

CHAT = {"messages": [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t."}]}


def _spec(tiny_model: Path, data: Path, **data_extra: object):
    return validate_spec({"name": "c", "model": {"base": str(tiny_model)},
                          "data": {"train": str(data), "eval": {"split_ratio": 0.25}, "bad_rows": "skip", **data_extra}})


def test_hit_is_identical_and_changes_miss(tiny_model: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([json.dumps(CHAT)] * 7 + ["{broken"]) + "\n")
    cold = prepare(_spec(tiny_model, data))
    warm = prepare(_spec(tiny_model, data))
    assert not cold.cached and warm.cached
    assert [(list(r.input_ids), list(r.labels), r.where) for r in warm.train.rows] == \
           [(r.input_ids, r.labels, r.where) for r in cold.train.rows]
    assert [s.where for s in warm.samples.eval] == [s.where for s in cold.samples.eval]
    assert [str(p) for p in warm.samples.skipped] == [str(p) for p in cold.samples.skipped] and warm.samples.skipped
    assert warm.file_hashes == cold.file_hashes and warm.has_chat
    assert not prepare(_spec(tiny_model, data, max_length=64)).cached  # settings are part of the key
    data.write_text(data.read_text() + json.dumps(CHAT) + "\n")
    changed = prepare(_spec(tiny_model, data))
    assert not changed.cached and len(changed.train.rows) + len(changed.eval.rows) == 8
