"""Merge memory: PEFT's in-memory merge (the whole model in fp32, merge_and_unload, save in the base's
dtype) vs kubetune's weight-at-a-time merge, on one random bf16 Llama saved in shards.

    python bench/merge_memory.py [--layers 16] [--hidden 1024] [--shard 200MB]

Each merge runs in a fresh process; the peak resident set (VmHWM) is printed with the ratio.
Target: the merge's growth is bounded by a few copies of one weight, whatever the model's or its shards' size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HWM = """
def hwm():  # this process's own peak resident set: ru_maxrss is inherited from the forking parent
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
"""

IN_MEMORY = HWM + """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32), sys.argv[2])
model.merge_and_unload(safe_merge=True).to(torch.bfloat16).save_pretrained(sys.argv[3], max_shard_size=sys.argv[4])
print(json.dumps({"peak": hwm()}))
"""

SHARDED = HWM + """
import json, sys
from pathlib import Path
from kubetune.train.shard_merge import merge_shards
merge_shards(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
print(json.dumps({"peak": hwm()}))
"""


def build(folder: Path, layers: int, hidden: int, shard: str) -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(2.6875 * hidden),
                      num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder / "base", max_shard_size=shard)
    get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).save_pretrained(
        folder / "adapter")
    return sum(p.stat().st_size for p in (folder / "base").glob("*.safetensors"))


def peak(script: str, *args: str) -> int:
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    return int(json.loads(run.stdout.splitlines()[-1])["peak"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard", default="200MB")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = build(folder, args.layers, args.hidden, args.shard)
        base, adapter = str(folder / "base"), str(folder / "adapter")
        old = peak(IN_MEMORY, base, adapter, str(folder / "old"), args.shard)
        new = peak(SHARDED, base, adapter, str(folder / "new"))
    gib = 2**30
    print(f"model: {size / gib:.2f} GiB bf16 in {args.shard} shards")
    print(f"in-memory (PEFT, fp32) peak RSS: {old / gib:.2f} GiB")
    print(f"weight at a time      peak RSS: {new / gib:.2f} GiB")
    print(f"ratio weight-at-a-time / in-memory: {new / old:.2f}")


if __name__ == "__main__":
    main()
