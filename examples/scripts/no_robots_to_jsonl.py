"""Delivery script for examples/d-minio-lora-sweep.yaml (run by `kubetune stage`): write the
HuggingFaceH4/no_robots chat rows as JSONL `messages` to $KUBETUNE_OUTPUT."""

import json
import os

from datasets import load_dataset

rows = load_dataset("HuggingFaceH4/no_robots", split="train")
with open(os.environ["KUBETUNE_OUTPUT"], "w") as out:
    for row in rows:
        out.write(json.dumps({"messages": row["messages"]}) + "\n")
