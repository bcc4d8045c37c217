"""A generated preference task the tiny model can learn: asked the colour of an animal, the chosen
answer names one of five colours and the rejected one one of five others. Chosen and rejected are
alike in form and length, so an untrained model prefers either about half the time."""

from __future__ import annotations

import json
import random
from pathlib import Path

GOOD = ["Blue", "Green", "Red", "Yellow", "Pink"]
BAD = ["Black", "Brown", "Grey", "Orange", "Purple"]
ANIMALS = ["fox", "owl", "cat", "dog", "bird", "fish", "Bear", "Wolf", "Tiger", "Rabbit", "Horse", "Duck", "Frog",
           "Goat", "Mouse"]


def write_pairs(path: Path, n: int, seed: int, fmt: str = "conversational") -> Path:
    """fmt: plain (strings), conversational (message lists, as TRL takes them) or openai (the preference
    fine-tuning file)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            animal = rng.choice(ANIMALS)
            question = f"What colour is the {animal}?"
            good, bad = f"The {animal} is {rng.choice(GOOD)}.", f"The {animal} is {rng.choice(BAD)}."
            if fmt == "plain":
                row: dict = {"prompt": question, "chosen": good, "rejected": bad}
            elif fmt == "conversational":
                row = {"prompt": [{"role": "user", "content": question}],
                       "chosen": [{"role": "assistant", "content": good}],
                       "rejected": [{"role": "assistant", "content": bad}]}
            else:
                row = {"input": {"messages": [{"role": "user", "content": question}]},
                       "preferred_output": [{"role": "assistant", "content": good}],
                       "non_preferred_output": [{"role": "assistant", "content": bad}]}
            fh.write(json.dumps(row) + "\n")
    return path


def write_labeled(path: Path, n: int, seed: int) -> Path:
    """KTO rows: one answer each, desirable (a colour from GOOD) or not (from BAD), half and half."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            animal, good = rng.choice(ANIMALS), rng.random() < 0.5
            fh.write(json.dumps({"prompt": [{"role": "user", "content": f"What colour is the {animal}?"}],
                                 "completion": [{"role": "assistant",
                                                 "content": f"The {animal} is {rng.choice(GOOD if good else BAD)}."}],
                                 "label": good}) + "\n")
    return path
