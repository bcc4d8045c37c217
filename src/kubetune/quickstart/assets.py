"""The project's own tiny model and data, built offline, for the quickstart and the tests.

The data is templated chat in three skills with one fixed answer form each, so a short LoRA run
on CPU visibly changes the answers (the random base model babbles). The tokenizer is a byte-level
BPE trained on that text plus filler, with the special tokens of three template families (ChatML,
Llama-3, Mistral) so tests can exercise several chat templates on one model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "grey", "orange", "purple", "brown", "pink", "golden"]
ANIMALS = ["fox", "cat", "dog", "horse", "rabbit", "bear", "wolf", "owl", "duck", "goat", "mouse", "tiger", "frog"]
WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "milk", "rain", "star", "ship", "lamp", "door", "bird",
         "cake", "moon", "road", "song", "wind", "rock", "leaf"]
SYSTEM = "You are a concise assistant."
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _question(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(0, 20), rng.randrange(0, 20)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        c, a = rng.choice(COLOURS), rng.choice(ANIMALS)
        return f"Describe a {c} {a}.", f"A {c} {a} is a {a} whose fur is {c}."
    w = rng.choice(WORDS)
    return f"Spell {w}.", f"{w} is spelled {'-'.join(w)}."


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
        for _turn in range(2 if rng.random() < 0.15 else 1):
            q, a = _question(rng)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": messages})
    return rows


def write_data(out: Path, n_train: int = 1200, n_eval: int = 60) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.jsonl", n_train, 1), ("eval.jsonl", n_eval, 2)):
        with (out / name).open("w") as fh:
            for row in make_rows(n, seed):
                fh.write(json.dumps(row) + "\n")


def _corpus(seed: int = 0) -> list[str]:
    """Varied text for the BPE trainer: a vocab of ~1000 needs more than one repeated phrase."""
    rng = random.Random(seed)
    lines = []
    for row in make_rows(3000, seed + 10):
        lines += [m["content"] for m in row["messages"]]
    filler = ["the", "a", "is", "of", "and", "to", "in", "what", "how", "why", "this", "that", "with", "answer",
              "question", "number", "colour", "animal", "word", "letter", "summary", "short", "long", "please"]
    vocab = COLOURS + ANIMALS + WORDS + filler + [str(i) for i in range(100)]
    for _ in range(4000):
        lines.append(" ".join(rng.choice(vocab) for _ in range(rng.randrange(4, 14))).capitalize() + ".")
    return lines


def build_model(out: Path, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 1000, seed: int = 0,
                init_std: float = 0.25) -> Path:
    """Write a tiny random-initialised Llama with a trained BPE tokenizer and ChatML template to ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False, initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    # Deliberately the plain base-model setting: generation stops at </s> only, while the ChatML
    # template ends turns with <|im_end|>. kubetune must notice and fix the saved generation config.
    model.generation_config = GenerationConfig(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                                               pad_token_id=fast.pad_token_id)
    model.save_pretrained(out)
    for f in out.iterdir():
        f.chmod(0o644)
    return out
