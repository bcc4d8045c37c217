"""Broken specs and files a user might write: exit 2, a located message, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

CASES = {
    # name: (spec sections, files to create, expected text in stderr)
    "spec-not-mapping": ("- a\n- b\n", {}, "a run spec is a YAML mapping"),
    "section-wrong-type": ("model: just-a-string\n", {}, "model: Input should be a valid dictionary"),
    "eval-wrong-type": ("data: {train: [DATA], eval: 3}\n", {}, "data.eval: expected a path/URI or a mapping"),
    "binary-jsonl": ("data: {train: F}\n", {"f.jsonl": b"\x00\x01garbage\xff\n"}, "f.jsonl:1: bad JSON"),
    "json-object-no-list": ("data: {train: F}\n", {"f.json": b'{"x": 1}'}, "expected a JSON array of rows"),
    "json-unclosed": ("data: {train: F}\n", {"f.json": b'[{"text": "a"},\n'}, "the array is not closed"),
    "empty-file": ("data: {train: F}\n", {"f.jsonl": b""}, "f.jsonl: no rows"),
    "corrupt-parquet": ("data: {train: F}\n", {"f.parquet": b"nope"}, "cannot read .parquet file"),
    "csv-unknown-columns": ("data: {train: F}\n", {"f.csv": b"a,b\n1,2\n"}, "cannot tell the format from the columns ['a', 'b']"),
    "text-part-without-text": ("data: {train: F}\n", {"f.jsonl": b'{"messages": [{"role": "user", "content": [{"type": "text"}]}, '
                                                                  b'{"role": "assistant", "content": "x"}]}\n'},
                               "content part {'type': 'text'} is not {'type': 'text', 'text': ...}"),
    "multimodal-content": ("data: {train: F}\n", {"f.jsonl": b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
                                                              b'"image_url": {"url": "x.png"}}]}, {"role": "assistant", "content": "x"}]}\n'},
                           "a 'image_url' part is not text: this is a text-only run"),
    "openai-preference-file": ("data: {train: F}\n", {"f.jsonl": b'{"input": {"messages": [{"role": "user", "content": "q"}]}, '
                                                                  b'"preferred_output": [{"role": "assistant", "content": "a"}], '
                                                                  b'"non_preferred_output": [{"role": "assistant", "content": "b"}]}\n'},
                               "and method.objective is sft"),
    "missing-template-file": ("model: {base: MODEL, chat_template: /nope.jinja}\n", {}, "model.chat_template: '/nope.jinja'"),
    "object-storage-output-no-credentials": ("output: s3://bucket/x\n", {}, "output s3://bucket/x: no storage credentials found"),
    "resume-not-a-checkpoint": ("resume: /tmp/definitely-not-here\n", {}, "is not a complete checkpoint"),
    "model-not-a-folder": ("model: {base: /tmp}\n", {}, "not a model folder (no config.json there)"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_input_is_exit_2_with_message(name: str, tmp_path: Path, tiny_model: Path, cli,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import QUICKSTART_DATA

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe for credentials

    body, files, expected = CASES[name]
    data_file = ""
    for fname, content in files.items():
        (tmp_path / fname).write_bytes(content)
        data_file = str(tmp_path / fname)
    body = body.replace("MODEL", str(tiny_model)).replace("DATA", str(QUICKSTART_DATA / "train.jsonl"))
    body = body.replace("train: F", f"train: {data_file}")
    defaults = {"name": "name: x\n", "model": f"model: {{base: {tiny_model}}}\n",
                "data": f"data: {{train: {QUICKSTART_DATA / 'train.jsonl'}}}\n"}
    if not body.startswith("- "):
        body += "".join(v for k, v in defaults.items() if not any(line.startswith(k + ":") for line in body.splitlines()))
    spec = tmp_path / "spec.yaml"
    spec.write_text(body)
    code, out, err = cli("validate", str(spec))
    assert code == 2, out + err
    assert expected in err
    assert "Traceback" not in err
