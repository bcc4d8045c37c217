"""Data: sources with file:line, format detection/conversion, every bad row reported, too_long, mixing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.data.dataset import load_samples, split_by_ratio
from kubetune.data.encode import encode_samples
from kubetune.data.template import ChatFormatter
from kubetune.errors import DataError
from kubetune.spec.models import DataSpec

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_all_bad_rows_reported_with_file_and_line(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [
        CHAT,
        '{"messages": [ broken',
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": []},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": 3}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        CHAT,
    ])
    with pytest.raises(DataError) as info:
        load_samples(DataSpec(train=[str(f)], eval=None), seed=0)
    got = [str(p) for p in info.value.problems]
    assert got == [
        f"{f}:2: bad JSON: Expecting value (column 16)",
        f"{f}:3: messages[0] has no 'role'",
        f"{f}:4: messages[0] (user) has no 'content'",
        f"{f}:5: messages[0]: unknown role 'robot'; expected one of system, user, assistant, tool, developer",
        f"{f}:6: empty conversation",
        f"{f}:7: column 'messages' must be a list of messages, got str",
        f"{f}:8: messages[0] (user): content must be a string or a list of text parts, got int",
        f"{f}:9: conversation has no assistant turn (nothing to train on)",
    ]
    assert "bad_rows: skip" in (info.value.hint or "")


def test_a_developer_message_is_the_system_prompt(tmp_path: Path) -> None:
    """OpenAI's newer name for the system role, which its reinforcement fine-tuning examples use: a
    training file written for OpenAI trains with it as the system prompt."""
    row = {"messages": [{"role": "developer", "content": "Answer with a number."}, *CHAT["messages"]]}
    f = _jsonl(tmp_path / "d.jsonl", [row])
    samples = load_samples(DataSpec(train=[str(f)], eval=None), seed=0)
    assert [m["role"] for m in samples.train[0].messages] == ["system", "user", "assistant"]
    assert samples.train[0].messages[0]["content"] == "Answer with a number."


def test_bad_rows_skip_counts_them(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [CHAT, "{oops", {"messages": []}, CHAT])
    samples = load_samples(DataSpec(train=[str(f)], eval=None, bad_rows="skip"), seed=0)
    assert len(samples.train) == 2 and len(samples.skipped) == 2
    assert samples.sources[0].skipped == 2


def test_formats_are_detected_per_source_and_converted(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1 and 2", "output": "3"},
                                  {"instruction": "Name a colour", "output": "Red"}], indent=1))
    pc = tmp_path / "p.csv"
    pc.write_text("prompt,completion\nWhat is up?,Not much.\n")
    txt = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["Plain text row."]}), txt)
    chat = _jsonl(tmp_path / "c.jsonl", [CHAT])
    spec = DataSpec(train=[str(alpaca), str(pc), str(txt), str(chat)], eval=None, system_prompt="Be kind.")
    samples = load_samples(spec, seed=0)
    assert [s.format for s in samples.sources] == ["alpaca", "prompt_completion", "text", "messages"]
    by_where = {s.where: s for s in samples.train}
    first = by_where[f"{alpaca}:2"]  # JSON arrays keep each row's line too
    assert first.messages == ({"role": "system", "content": "Be kind."}, {"role": "user", "content": "Add\n\n1 and 2"},
                              {"role": "assistant", "content": "3"})
    assert by_where[f"{pc}:2"].messages[-1] == {"role": "assistant", "content": "Not much."}
    assert by_where[f"{txt}#row1"].text == "Plain text row."


def test_column_mapping_and_wrong_column_type(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because."}, {"question": 7, "answer": "x"}])
    spec = DataSpec(train=[{"path": str(f), "format": "prompt_completion",
                            "columns": {"prompt": "question", "completion": "answer"}}], eval=None)
    with pytest.raises(DataError) as info:
        load_samples(spec, seed=0)
    assert [str(p) for p in info.value.problems] == [f"{f}:2: column 'question' must be a string, got int"]


def test_undetectable_format_says_what_to_set(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "x.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(DataError) as info:
        load_samples(DataSpec(train=[str(f)], eval=None), seed=0)
    assert "cannot tell the format from the columns ['a', 'q']" in str(info.value.problems[0])
    assert "data.columns" in info.value.hint


def test_weights_and_stable_split(tmp_path: Path) -> None:
    a = _jsonl(tmp_path / "a.jsonl", [CHAT] * 10)
    b = _jsonl(tmp_path / "b.jsonl", [CHAT] * 10)
    spec = DataSpec(train=[{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}], eval=None)
    samples = load_samples(spec, seed=1)
    assert sum(s.where.startswith(str(a)) for s in samples.train) == 20
    assert sum(s.where.startswith(str(b)) for s in samples.train) == 5
    rows = load_samples(DataSpec(train=[str(a)], eval=None), seed=1).train
    tr1, ev1 = split_by_ratio(rows, 0.2, seed=3)
    tr2, ev2 = split_by_ratio(list(reversed(rows)), 0.2, seed=3)
    assert len(ev1) == 2 and {s.where for s in ev1} == {s.where for s in ev2}  # order-independent, seeded


def test_too_long_truncate_drop_error(tmp_path: Path, tiny_model: Path) -> None:
    long = {"messages": [{"role": "user", "content": "Spell cat. " * 5},
                         {"role": "assistant", "content": "cat is spelled c-a-t. " * 30}]}
    f = _jsonl(tmp_path / "d.jsonl", [CHAT, long, CHAT])
    fmt = ChatFormatter(tiny_model)
    samples = load_samples(DataSpec(train=[str(f)], eval=None), seed=0).train
    cut = encode_samples(samples, fmt, 64, "truncate", "assistant")
    assert cut.truncated == 1 and len(cut.rows) == 3 and max(len(r.input_ids) for r in cut.rows) == 64
    dropped = encode_samples(samples, fmt, 64, "drop", "assistant")
    assert dropped.dropped == 1 and len(dropped.rows) == 2
    with pytest.raises(DataError) as info:
        encode_samples(samples, fmt, 64, "error", "assistant")
    (problem,) = info.value.problems
    assert problem.where == f"{f}:2" and "tokens > data.max_length 64" in problem.message


def test_truncation_that_removes_every_trained_token_drops_the_row(tmp_path: Path, tiny_model: Path) -> None:
    row = {"messages": [{"role": "user", "content": "Describe a red fox. " * 20}, {"role": "assistant", "content": "Ok."}]}
    f = _jsonl(tmp_path / "d.jsonl", [row])
    samples = load_samples(DataSpec(train=[str(f)], eval=None), seed=0).train
    rep = encode_samples(samples, ChatFormatter(tiny_model), 32, "truncate", "assistant")
    assert rep.rows == [] and rep.no_trained_tokens == 1


def test_hub_dataset_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_samples(DataSpec(train=["hf://nobody-has/this-dataset:train"], eval=None), seed=0)
    msg = str(info.value.problems[0])
    assert msg.startswith("hf://nobody-has/this-dataset:train: cannot load dataset 'nobody-has/this-dataset'")


def test_folder_source_reads_every_supported_file(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    (folder / "nested").mkdir(parents=True)
    _jsonl(folder / "a.jsonl", [CHAT, CHAT])
    _jsonl(folder / "nested" / "b.jsonl", [CHAT])
    (folder / "notes.txt").write_text("ignored")
    samples = load_samples(DataSpec(train=[str(folder)], eval=None), seed=0)
    assert sorted(s.where for s in samples.train) == [f"{folder}/a.jsonl:1", f"{folder}/a.jsonl:2",
                                                      f"{folder}/nested/b.jsonl:1"]
    assert sorted(map(str, samples.files)) == [f"{folder}/a.jsonl", f"{folder}/nested/b.jsonl"]


def test_files_are_read_by_content_not_by_name(tmp_path: Path, write_spec, cli) -> None:
    import gzip

    import zstandard

    rows = [CHAT, {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}] * 20
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    files = {
        "array.jsonl": json.dumps(rows, indent=2).encode(),     # what stage makes of a Hub file that is one JSON array
        "lines.json": lines,                                    # JSON lines under a .json name
        "wrapped.jsonl": json.dumps({"data": rows}, indent=1).encode(),
        "one-row.jsonl": (json.dumps(CHAT) + "\n").encode(),     # one JSON line is a row, not a document
        "rows.jsonl.gz": gzip.compress(lines),
        "rows.jsonl.zst": zstandard.ZstdCompressor().compress(lines),
        "array.json.gz": gzip.compress(json.dumps(rows).encode()),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        samples = load_samples(DataSpec(train=[str(tmp_path / name)], eval=None), seed=0)
        assert len(samples.train) == (1 if name == "one-row.jsonl" else 40), name
        assert samples.train[0].messages[0]["role"] == "user"
    first = load_samples(DataSpec(train=[str(tmp_path / "array.jsonl")], eval=None), seed=0)
    assert {s.where.rsplit(":", 1)[0] for s in first.train} == {str(tmp_path / "array.jsonl")}
    # through the CLI as a user would: the array named .jsonl validates, a folder of compressed files too
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl.zst").write_bytes(files["rows.jsonl.zst"])
    (folder / "b.json.gz").write_bytes(files["array.json.gz"])
    for source in (tmp_path / "array.jsonl", folder):
        code, out, err = cli("validate", str(write_spec(name="bycontent", data={"train": str(source)})))
        assert code == 0, err
        assert ("messages, 40 rows" if source.is_file() else "messages, 80 rows") in out


def test_a_corrupt_compressed_file_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl.zst").write_bytes(b"definitely not zstd")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"definitely not gzip")
    for name in ("bad.jsonl.zst", "bad.jsonl.gz"):
        with pytest.raises(DataError) as info:
            load_samples(DataSpec(train=[str(tmp_path / name)], eval=None), seed=0)
        assert str(info.value.problems[0]).startswith(f"{tmp_path / name}: cannot read")


def test_sharegpt_rows_are_detected_and_their_speakers_mapped(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"from": "human", "value": "Weather?"},
                               {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
                               {"from": "observation", "value": "{\"temp\": 3}"}, {"from": "gpt", "value": "3 °C."}]}]
    samples = load_samples(DataSpec(train=[str(_jsonl(tmp_path / "s.jsonl", rows))], eval=None), seed=0)
    assert samples.sources[0].format == "sharegpt"
    first, second = samples.train
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert [m["role"] for m in second.messages] == ["user", "assistant", "tool", "assistant"]
    assert second.messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                                  "arguments": {"city": "Oslo"}}}]
    bad = _jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}])
    with pytest.raises(DataError) as info:
        load_samples(DataSpec(train=[str(bad)], eval=None), seed=0)
    assert "conversations[0]: unknown role 'narrator'; expected one of human, user, gpt" in str(info.value.problems[0])


def test_openai_fine_tuning_rows_keep_tools_weights_parts_and_reasoning(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    row = {"tools": tools, "parallel_tool_calls": False, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Call "}, {"type": "text", "text": "f."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {"role": "assistant", "content": "Bad answer.", "weight": 0},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Done.", "reasoning_content": "f said done.", "weight": 1}]}
    (sample,) = load_samples(DataSpec(train=[str(_jsonl(tmp_path / "o.jsonl", [row]))], eval=None), seed=0).train
    assert sample.tools == tuple(tools)
    assert sample.messages[0]["content"] == "Call f."
    assert sample.messages[1]["content"] is None and sample.messages[1]["tool_calls"][0]["function"]["arguments"] == {}
    assert sample.messages[2] == {"role": "tool", "content": "done", "tool_call_id": "c1"}
    assert sample.messages[3]["weight"] == 0 and "weight" not in sample.messages[5]
    assert sample.messages[5]["reasoning_content"] == "f said done."


def test_weight_zero_turns_are_context_not_target(tiny_model: Path) -> None:
    fmt = ChatFormatter(tiny_model)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away.", "weight": 0},
            {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}]
    ids, labels = fmt.encode_chat(conv)
    trained = fmt.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert "Hello there." in trained and "Go away" not in trained
    assert "Go away." in fmt.decode(ids)  # still in the context the model sees
