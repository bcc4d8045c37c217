"""The transformers engine: one model in memory (a merged model, or a base with one or more
PEFT adapters), each served name mapped to its tokenizer, chat template and generation config.

Generation is transformers' own `generate`; this module only decides which weights answer
(`set_adapter` / `disable_adapter`), renders prompts with the run's saved template, and streams
token ids out of `generate` through a streamer so a server can send them as they come.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kubetune.data.template import ChatFormatter
from kubetune.data.tool_calls import ToolCallFormat, format_for
from kubetune.errors import UsageError
from kubetune.storage.model_files import read_model_config


@dataclass
class ServedModel:
    name: str
    tokenizer: Any
    generation: Any                 # transformers.GenerationConfig: eos = the run's end-of-turn token(s)
    formatter: ChatFormatter        # renders and tokenises prompts exactly as training did
    adapter: str | None = None      # PEFT adapter name; None = the base weights
    source: str = ""                # what was loaded, for /v1/models and logs
    tool_format: ToolCallFormat | None = None   # how tool calls are read back from answers

    @property
    def stop_ids(self) -> set[int]:
        eos = self.generation.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


@dataclass
class GenerationParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Finished:
    completion_tokens: int
    finish_reason: str               # "stop" (end of turn or a stop string) or "length"


class _Streamer:
    """transformers streamer protocol (put/end): forwards new token ids to a callback."""

    def __init__(self, on_tokens: Callable[[list[int]], None]) -> None:
        self._on_tokens, self._prompt_seen = on_tokens, False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt itself
            self._prompt_seen = True
            return
        self._on_tokens([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


class TransformersEngine:
    """Holds the weights; `generate` runs one request at a time (callers serialise through a worker)."""

    def __init__(self, model: Any, served: Sequence[ServedModel], context_length: int) -> None:
        self.model = model
        self.served = {m.name: m for m in served}
        self.context_length = context_length
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self.served)

    def encode_chat(self, name: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None, prefix: str = "") -> list[int]:
        """Token ids of a conversation, through the run's saved chat template, rendered and tokenised by
        the code that built the training samples (TemplateMismatch when the template refuses it, or
        would drop its tools or tool calls); `prefix`: the forced start of the answer."""
        formatter = self.served[name].formatter
        formatter.check_tools(tools, any(m.get("tool_calls") for m in messages))
        return formatter.encode_prompt(messages, tools, add_generation_prompt, prefix)

    def encode(self, name: str, prompt: str) -> list[int]:
        return list(self.served[name].tokenizer(prompt)["input_ids"])

    def decode(self, name: str, ids: Sequence[int], keep_special: bool = False) -> str:
        """The answer's text; `keep_special`: with special tokens (Mistral's [TOOL_CALLS] is one), less
        the end-of-turn token, for reading tool calls."""
        served = self.served[name]
        if keep_special:
            stops = served.stop_ids
            return served.tokenizer.decode([i for i in ids if i not in stops], skip_special_tokens=False)
        return served.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, name: str, prompt_ids: list[int], params: GenerationParams,
                 on_tokens: Callable[[list[int]], None], should_stop: Callable[[], bool]) -> Finished:
        """Generate for one request; `on_tokens` gets new ids as they come, `should_stop` ends early
        (a stop string was seen, or the client went away)."""
        import copy

        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        served = self.served[name]
        gen = copy.deepcopy(served.generation)
        gen.max_new_tokens = params.max_tokens
        gen.do_sample = params.temperature > 0
        if gen.do_sample:
            gen.temperature, gen.top_p, gen.top_k = params.temperature, params.top_p, None
        else:
            gen.temperature = gen.top_p = gen.top_k = None
        if gen.pad_token_id is None:
            gen.pad_token_id = served.tokenizer.pad_token_id
        produced: list[int] = []

        def forward(ids: list[int]) -> None:
            produced.extend(ids)
            on_tokens(ids)

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool)

        with self._lock, torch.no_grad(), self._weights_for(served):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            ids = torch.tensor([prompt_ids])
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                streamer=_Streamer(forward), stopping_criteria=StoppingCriteriaList([_Stop()]))
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        ended = bool(produced) and produced[-1] in eos
        reason = "stop" if ended or should_stop() else ("length" if len(produced) >= params.max_tokens else "stop")
        count = len(produced) - (1 if ended else 0)  # the end-of-turn token is not part of the answer
        return Finished(completion_tokens=count, finish_reason=reason)

    def _weights_for(self, served: ServedModel) -> contextlib.AbstractContextManager[Any]:
        if not hasattr(self.model, "peft_config"):
            return contextlib.nullcontext()
        if served.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(served.adapter)
        return contextlib.nullcontext()


def load_engine(targets: Sequence[str], served_name: str | None = None, with_base: bool = True) -> TransformersEngine:
    """An engine for one model folder, one run, or several adapter runs of the same base.

    A run is served under its run name with the tokenizer, template and generation config saved
    with it; an adapter run needs no merge (PEFT applies it). The base of adapter runs is also
    served, under its folder/repo name, with the run's template (as `kubetune eval` compares them).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from kubetune.hf import quiet_progress_bars
    from kubetune.storage import resolve_model
    from kubetune.storage.runs import Run
    from kubetune.storage.store import uri_basename

    quiet_progress_bars()
    if not targets:
        raise UsageError("nothing to serve", "pass a run folder (runs/NAME) or a model folder")
    if len(targets) == 1 and (Path(targets[0]) / "config.json").exists() and not (Path(targets[0]) / "spec.yaml").exists():
        return _whole_model(Path(targets[0]), served_name or Path(targets[0]).name)

    runs = []
    for target in targets:
        run = Run.open(target)
        final = run.final_model()
        runs.append((run.spec, final.folder, final.merged))
    if len(runs) == 1 and runs[0][2]:
        spec, folder, _ = runs[0]
        return _whole_model(folder, served_name or spec.name, spec.serve.tool_parser)
    bases = {str(resolve_model(s.model.base, s.model.revision).resolve()) for s, _, _ in runs}
    if len(bases) > 1 or any(m for _, _, m in runs):
        raise UsageError("several runs can be served together only as adapters of one base model",
                         f"these runs have bases {sorted(bases)}; serve them one per server")
    base_dir = Path(bases.pop())
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    served: list[ServedModel] = []
    model: Any = None
    for spec, folder, _ in runs:
        tok = AutoTokenizer.from_pretrained(folder)
        gen = GenerationConfig.from_pretrained(folder)
        name = served_name if (served_name and len(runs) == 1) else spec.name
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
        formatter = _formatter(folder, tok)
        served.append(ServedModel(name, tok, gen, formatter, name, str(folder),
                                  format_for(formatter.template, spec.serve.tool_parser)))
    if with_base:
        first_spec = runs[0][0]
        base_name = uri_basename(first_spec.model.base)
        if base_name not in {s.name for s in served}:
            first = served[0]
            served.append(ServedModel(base_name, first.tokenizer, first.generation, first.formatter, None,
                                      str(base_dir), first.tool_format))
    model.eval()
    return TransformersEngine(model, served, _context(base_dir))


def _whole_model(folder: Path, name: str, tool_parser: str = "auto") -> TransformersEngine:
    """A model folder (a merged run, or any save_pretrained folder with a chat template), served as is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    _require_template(tok, str(folder))
    gen = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").exists() \
        else GenerationConfig.from_model_config(model.config)
    formatter = _formatter(folder, tok)
    served = ServedModel(name, tok, gen, formatter, None, str(folder), format_for(formatter.template, tool_parser))
    return TransformersEngine(model, [served], _context(folder))


def _formatter(folder: Path, tok: Any) -> ChatFormatter:
    """The training formatter for a served folder; one without tokenizer.json (a slow tokenizer) gets
    the fast conversion transformers made, saved beside the process."""
    if (Path(folder) / "tokenizer.json").exists():
        return ChatFormatter(Path(folder))
    import tempfile

    converted = Path(tempfile.mkdtemp(prefix="kubetune-tokenizer-"))
    tok.save_pretrained(converted)
    return ChatFormatter(converted)


def _require_template(tok: Any, where: str) -> None:
    if not getattr(tok, "chat_template", None):
        raise UsageError(f"{where}: the tokenizer has no chat template",
                         "serve a kubetune run (its template is saved with it), or add chat_template.jinja to the folder")


def _context(model_dir: Path) -> int:
    cfg = read_model_config(model_dir)
    return int(cfg.get("max_position_embeddings") or 2048)


def iter_text(decode: Callable[[list[int]], str], ids: list[int], sent: str) -> tuple[str, str]:
    """(new text since `sent`, full text) for the ids so far; holds back a half-decoded character."""
    text = decode(ids)
    if text.endswith("\ufffd"):
        return "", sent
    return (text[len(sent):] if text.startswith(sent) else ""), text


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

