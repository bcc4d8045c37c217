"""Preference data for DPO: three formats, masks from the chat template, every bad row by file:line."""

from __future__ import annotations

import json
from pathlib import Path

from tests.preferences import write_pairs

DPO = {"type": "lora", "objective": "dpo"}


def test_every_format_gives_the_same_pairs(write_spec, tmp_path: Path, cli) -> None:
    shown = {}
    for fmt in ("plain", "conversational", "openai"):
        data = write_pairs(tmp_path / f"{fmt}.jsonl", 5, seed=7, fmt=fmt)
        spec = write_spec(name=f"p-{fmt[:4]}", method=DPO, data={"train": str(data), "eval": None})
        code, out, err = cli("plan", str(spec), "--show", "5", "--json")
        assert code == 0, err
        shown[fmt] = [json.loads(line) for line in out.splitlines()]
    plain, conv, openai = (shown[k] for k in ("plain", "conversational", "openai"))
    strip = [[(s["ids"], s["trained"]) for s in row["chosen"] + row["rejected"]] for row in plain]
    assert strip == [[(s["ids"], s["trained"]) for s in row["chosen"] + row["rejected"]] for row in conv]
    assert strip == [[(s["ids"], s["trained"]) for s in row["chosen"] + row["rejected"]] for row in openai]
    first = conv[0]
    # the prompt is the template's context up to the assistant's turn; each answer ends with the end of turn
    assert first["chosen"][0]["text"].endswith("<|im_start|>assistant\n") and not first["chosen"][0]["trained"]
    assert first["chosen"][1]["text"].endswith("<|im_end|>") and first["chosen"][1]["trained"]
    assert first["chosen"][0]["ids"] == first["rejected"][0]["ids"]


def test_bad_pairs_are_reported_by_file_and_line(write_spec, tmp_path: Path, cli) -> None:
    good = {"prompt": "What colour is the fox?", "chosen": "The fox is Blue.", "rejected": "The fox is Grey."}
    rows = [good, {**good, "chosen": None}, {**good, "rejected": good["chosen"]},
            {**good, "chosen": [{"role": "user", "content": "hi"}]}, {**good, "prompt": []}, good]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, err = cli("validate", str(write_spec(name="bad", method=DPO, data={"train": str(data), "eval": None})))
    assert code == 2 and "Traceback" not in err
    assert f"{data}:2" in err and "missing column 'chosen'" in err
    assert f"{data}:3" in err and "the same answer" in err
    assert f"{data}:4" in err and "must be an assistant message" in err
    assert f"{data}:5" in err and f"{data}:1:" not in err and f"{data}:6" not in err


def test_objective_and_data_must_agree(write_spec, tmp_path: Path, cli) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 5, seed=8, fmt="openai")
    code, _, err = cli("validate", str(write_spec(name="sft-on-pairs", data={"train": str(pairs), "eval": None})))
    assert code == 2 and "method.objective is sft" in err and "method.objective: dpo" in err
    from tests.conftest import QUICKSTART_DATA

    code, _, err = cli("validate", str(write_spec(name="dpo-on-chats", method=DPO,
                                                  data={"train": str(QUICKSTART_DATA / "train.jsonl"), "eval": None})))
    assert code == 2 and "no preference pairs" in err
    code, _, err = cli("validate", str(write_spec(name="dpo-rouge", method=DPO, eval={"metrics": ["rouge"]},
                                                  data={"train": str(pairs), "eval": None})))
    assert code == 2 and "eval.metrics" in err


def test_kto_rows_and_pairs(write_spec, tmp_path: Path, cli) -> None:
    from tests.preferences import write_labeled

    labeled = write_labeled(tmp_path / "labeled.jsonl", 6, seed=1)
    code, _, err = cli("validate", str(write_spec(name="sft-on-kto", data={"train": str(labeled), "eval": None})))
    assert code == 2 and "method.objective is sft" in err  # not trained as prompt/completion SFT, bad answers too
    kto = {"type": "lora", "objective": "kto"}
    code, out, err = cli("validate", str(write_spec(name="kto", method=kto, data={"train": str(labeled), "eval": None})))
    assert code == 0 and "kto, 6 rows" in out and "train labeled answers 6" in out, err
    pairs = write_pairs(tmp_path / "pairs.jsonl", 5, seed=2)  # a pair is two labeled answers
    code, out, _ = cli("validate", str(write_spec(name="kto-pairs", method=kto, data={"train": str(pairs), "eval": None})))
    assert code == 0 and "train labeled answers 10" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n"
                   + json.dumps({"prompt": "q", "completion": "a", "label": True}) + "\n")
    code, _, err = cli("validate", str(write_spec(name="kto-bad", method=kto, data={"train": str(bad), "eval": None})))
    assert code == 2 and f"{bad}:1" in err and "must be true or false" in err and f"{bad}:2" not in err
