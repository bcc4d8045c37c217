"""The control plane from a notebook's point of view: the official openai client fine-tunes the
quickstart model through `kubetune server`, follows the job, and chats with the result.

    python examples/control_plane.py http://127.0.0.1:8080 [API_KEY]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent


def main(url: str, key: str = "none") -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key)
    upload = client.files.create(file=(ROOT / "examples/data/quickstart/train.jsonl").open("rb"), purpose="fine-tune")
    print(f"uploaded {upload.filename}: {upload.id} ({upload.bytes:,} bytes)")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=upload.id, suffix="demo",  # offered by the server's --models-root
        hyperparameters={"batch_size": 16, "learning_rate_multiplier": 15},
        extra_body={"kubetune": {"train": {"max_steps": 600, "save_every_steps": 200, "logging_steps": 50,
                                           "max_per_device_batch_size": 16},
                                 "data": {"max_length": 128}}})
    print(f"job {job.id}: {job.status}")
    status, seen = job.status, set()
    while status not in ("succeeded", "failed", "cancelled"):
        time.sleep(1)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=20).data):
            if event.id not in seen:
                seen.add(event.id)
                print(f"  {event.message}")
        job = client.fine_tuning.jobs.retrieve(job.id)
        status = job.status
    if status != "succeeded":
        raise SystemExit(f"job {status}: {job.error}")
    print(f"job {job.id}: succeeded, {job.trained_tokens:,} tokens trained → {job.fine_tuned_model}")
    for ckpt in client.fine_tuning.jobs.checkpoints.list(job.id):
        print(f"  checkpoint {ckpt.fine_tuned_model_checkpoint} (train loss {ckpt.metrics.train_loss:.3f})")
    for question in ("Spell moon.", "What is 3 plus 4?"):
        answer = client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=32,
                                                messages=[{"role": "user", "content": question}])
        print(f"  {question} → {answer.choices[0].message.content}")


if __name__ == "__main__":
    main(*sys.argv[1:])
