"""The transformers engine: each served name mapped to its weights (a `Lane`: one model behind
transformers' continuous batching), its tokenizer, chat template and generation config.

Adapter runs of one base: the base is loaded once; each adapter is either merged into a copy of it
in memory (checked: the logits must match adapter-on-base, as `kubetune merge` checks) or applied
unmerged by PEFT on a copy that shares the base's weight tensors. transformers batches one set of
weights at a time (its batch is one packed row of tokens, PEFT's mixed-adapter batches split by row),
so each adapter is a lane of its own, batching its requests; lanes run side by side.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kubetune.data.template import ChatFormatter
from kubetune.data.tool_calls import ToolCallFormat, format_for
from kubetune.errors import UsageError
from kubetune.serve.batching import Direct, EngineFailed, Lane, Loop, Request
from kubetune.serve.workers import LaneSpec, PooledLane, WorkerPool, auto_workers
from kubetune.storage.model_files import read_model_config


ADAPTER_MODES = ("auto", "merged", "unmerged")
MERGE_TOLERANCE = 1e-4  # of the logits' scale: an in-memory merge is accepted as `kubetune merge` accepts one


@dataclass
class ServedModel:
    name: str
    tokenizer: Any
    generation: Any                 # transformers.GenerationConfig: eos = the run's end-of-turn token(s)
    formatter: ChatFormatter        # renders and tokenises prompts exactly as training did
    lane: Lane | PooledLane         # the weights that answer, behind continuous batching (here or in workers)
    source: str = ""                # what was loaded, for /v1/models and logs
    tool_format: ToolCallFormat | None = None   # how tool calls are read back from answers
    weights: str = "as saved"       # how the weights were prepared, for the start-up line

    @property
    def stop_ids(self) -> set[int]:
        return _stops(self.generation)

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        """The answer's text; `keep_special`: with special tokens (Mistral's [TOOL_CALLS] is one), less
        the end-of-turn token, for reading tool calls."""
        if keep_special:
            stops = self.stop_ids
            return self.tokenizer.decode([i for i in ids if i not in stops], skip_special_tokens=False)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


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


def finish_of(ids: Sequence[int], stops: set[int], max_tokens: int, cut: bool) -> Finished:
    """The Finished record of an answer's token ids (`cut`: ended early by a stop string or the caller)."""
    ended = bool(ids) and ids[-1] in stops
    reason = "length" if not (ended or cut) and len(ids) >= max_tokens else "stop"
    return Finished(completion_tokens=len(ids) - (1 if ended else 0), finish_reason=reason)


@dataclass(frozen=True)
class AdapterBase:
    """What a running engine needs to take one more adapter of its base: the base weights, as
    loaded, and how adapters are applied to them."""
    model: Any
    folder: Path
    context: int
    adapters: str                   # auto | merged | unmerged (ADAPTER_MODES)
    max_concurrency: int


class TransformersEngine:
    """Served names → lanes. `submit` queues a request into its lane's running batch. An engine of
    adapter runs built with `growable` takes more adapters of its base while it serves (`add_adapter`)
    and lets one go (`remove`): the base stays loaded, the other lanes keep answering."""

    def __init__(self, served: Sequence[ServedModel], context_length: int, max_concurrency: int = 64,
                 workers: int | str = 1, base: AdapterBase | None = None) -> None:
        self.served = {m.name: m for m in served}
        self.context_length = context_length
        self.base = base
        lanes = [m.lane for m in served if isinstance(m.lane, Lane)]
        count = auto_workers([lane.model for lane in lanes]) if workers == "auto" else int(workers)
        self.workers = count if lanes else 1
        self.note = ""
        if count > 1 and lanes:  # the same lanes, in worker processes over the same weights (serve.workers)
            try:
                pool = WorkerPool([LaneSpec(m.name, m.lane.model, m.lane.eos, m.lane.pad) for m in served],
                                  count, max_concurrency, context_length)
            except Exception as exc:  # noqa: BLE001 - e.g. weights that cannot be shared with another process
                if workers != "auto":
                    raise UsageError(f"--workers {count}: the engine workers could not start: {exc}",
                                     "serve with --workers 1 (batching in the server process)") from None
                self.workers, self.note = 1, f"engine workers could not start ({exc}); batching in this process"
            else:
                for m in served:
                    m.lane = pool.lane(m.name)

    @property
    def names(self) -> list[str]:
        return list(self.served)

    @property
    def growable(self) -> bool:
        return self.base is not None and self.workers == 1

    def add_adapter(self, target: str, name: str) -> ServedModel:
        """Serve one more adapter run of this engine's base under `name`, without reloading the base.
        UsageError for a run of another base, or a whole model."""
        from kubetune.storage import resolve_model
        from kubetune.runs.run import Run

        if not self.growable or self.base is None:
            raise UsageError(f"{name}: this engine takes no more adapters", "load an engine for it")
        run = Run.open(target)
        final = run.final_model()
        base_dir = resolve_model(run.spec.model.base, run.spec.model.revision).resolve()
        if final.merged or base_dir != self.base.folder:
            raise UsageError(f"{name}: not an adapter of {self.base.folder.name}", "serve it in an engine of its own")
        lanes = sum(1 for m in self.served.values() if isinstance(m.lane, Lane))
        merge = self.base.adapters == "merged" or (self.base.adapters == "auto" and
                                                    _copies_fit(self.base.model, lanes + 1))
        added = _adapter_model(self.base, run.spec, final.folder, name, merge, in_place=False)
        self.served = {**self.served, name: added}  # a new mapping: readers see the old one or the new one
        return added

    def remove(self, name: str) -> None:
        """Stop serving `name`: new requests for it are 404; its lane stops once the requests it has
        are answered (without blocking the caller, which may be the event loop)."""
        gone = self.served.get(name)
        if gone is None:
            return
        self.served = {k: v for k, v in self.served.items() if k != name}
        gone.lane.close_when_idle()

    @property
    def failure(self) -> str | None:
        """Why the engine cannot answer any more (a lane's batching thread died), or None."""
        failed = [f"{m.name}: {m.lane.failure}" for m in self.served.values() if m.lane.failure is not None]
        return "; ".join(failed) or None

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
        return self.served[name].decode(ids, keep_special)

    def model(self, name: str) -> ServedModel:
        """`name`'s model, held by a request for its whole life: a model removed meanwhile (a deleted or
        evicted adapter) still decodes and cancels that request's tokens, and its lane finishes it."""
        served = self.served.get(name)
        if served is None:  # removed (a deleted model) after the request was admitted
            raise EngineFailed(f"{name} is no longer served")
        return served

    def submit(self, name: str, prompt_ids: list[int], params: GenerationParams, on_output: Callable[[Any], None],
               loop: Loop) -> Request:
        """Queue a request into the running batch of `name`'s lane; `on_output` gets, through `loop`, a
        transformers GenerationOutput (all token ids so far) per step, the last one finished."""
        return submit_to(self.model(name), prompt_ids, params, on_output, loop)

    def cancel(self, name: str, request: Request) -> None:
        self.served[name].lane.cancel(request)

    def generate(self, name: str, prompt_ids: list[int], params: GenerationParams,
                 on_tokens: Callable[[list[int]], None]) -> Finished:
        """One request, blocking (for callers without an event loop): new ids go to `on_tokens` as they come."""
        outputs: queue.Queue[Any] = queue.Queue()
        request = self.submit(name, prompt_ids, params, outputs.put, Direct())
        ids: list[int] = []
        try:
            while True:
                output = outputs.get(timeout=600)
                if output.error:
                    raise EngineFailed(output.error)
                on_tokens(list(output.generated_tokens[len(ids):]))
                ids = list(output.generated_tokens)
                if output.is_finished():
                    return finish_of(ids, self.served[name].stop_ids, params.max_tokens, cut=False)
        except BaseException:
            self.cancel(name, request)
            raise

    def close(self) -> None:
        for lane in {id(m.lane): m.lane for m in self.served.values()}.values():  # a pool closes once
            lane.close()


def submit_to(served: ServedModel, prompt_ids: list[int], params: GenerationParams,
              on_output: Callable[[Any], None], loop: Loop) -> Request:
    return served.lane.submit(prompt_ids, params.max_tokens, params.temperature, params.top_p, params.seed,
                              on_output, loop)


def load_engine(targets: Sequence[str], served_name: str | None = None, with_base: bool = True,
                max_concurrency: int = 64, adapters: str = "auto",
                names: Sequence[str] | None = None, workers: int | str = 1,
                growable: bool = False) -> TransformersEngine:
    """An engine for one model folder, one run, or several adapter runs of the same base.

    A run is served under its run name with the tokenizer, template and generation config saved
    with it; an adapter run needs no merge on disk. `adapters`: merged (a merged copy per adapter in
    memory, logits checked), unmerged (PEFT on shared base weights: one copy of the base whatever the
    number of adapters), auto (merged when the copies fit in half of the free memory, else unmerged).
    The base of adapter runs is also served, under its folder/repo name, with the run's template (as
    `kubetune eval` compares them). `names`: the served name of each target instead (the control
    plane serves runs as ft:BASE:SUFFIX:ID). `workers`: processes the lanes run in (serve.workers;
    "auto": 2 for small weights on a multi-core CPU), 1 = in this process. `growable`: adapter runs
    are served so that more adapters of the base can be added later (the base is never merged into in
    place).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.hf import quiet_progress_bars
    from kubetune.storage import resolve_model
    from kubetune.runs.run import Run, is_model_folder, model_folder_name
    from kubetune.uris import uri_basename

    quiet_progress_bars()
    if adapters not in ADAPTER_MODES:
        raise UsageError(f"--adapters {adapters}: not a mode", f"use one of {', '.join(ADAPTER_MODES)}")
    if not targets:
        raise UsageError("nothing to serve", "pass a run folder (runs/NAME) or a model folder")
    if len(targets) == 1 and is_model_folder(targets[0]):
        return _whole_model(Path(targets[0]), served_name or model_folder_name(targets[0]), max_concurrency,
                            workers=workers)

    runs = []
    for target in targets:
        run = Run.open(target)
        final = run.final_model()
        runs.append((run.spec, final.folder, final.merged))
    if len(runs) == 1 and runs[0][2]:
        spec, folder, _ = runs[0]
        return _whole_model(folder, names[0] if names else served_name or spec.name, max_concurrency,
                            spec.serve.tool_parser, workers)
    bases = {str(resolve_model(s.model.base, s.model.revision).resolve()) for s, _, _ in runs}
    if len(bases) > 1 or any(m for _, _, m in runs):
        raise UsageError("several runs can be served together only as adapters of one base model",
                         f"these runs have bases {sorted(bases)}; serve them one per server")
    base_dir = Path(bases.pop())
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    context = _context(base_dir)
    merge = adapters == "merged" or (adapters == "auto" and _copies_fit(base, len(runs)))
    shared = AdapterBase(base, base_dir, context, adapters, max_concurrency)
    served: list[ServedModel] = []
    for k, (spec, folder, _) in enumerate(runs):
        name = names[k] if names else served_name if (served_name and len(runs) == 1) else spec.name
        alone = len(runs) == 1 and not with_base and not growable  # nothing else needs the base weights as they are
        served.append(_adapter_model(shared, spec, folder, name, merge, in_place=alone))
    if with_base:
        first_spec = runs[0][0]
        base_name = uri_basename(first_spec.model.base)
        if base_name not in {s.name for s in served}:
            first = served[0]
            lane = Lane(base, sorted(first.stop_ids), _pad(first.generation, first.tokenizer), max_concurrency, context)
            served.append(ServedModel(base_name, first.tokenizer, first.generation, first.formatter, lane,
                                      str(base_dir), first.tool_format, "base weights"))
    return TransformersEngine(served, context, max_concurrency, workers, shared if growable else None)


def _adapter_model(base: AdapterBase, spec: Any, folder: Path, name: str, merge: bool, in_place: bool) -> ServedModel:
    """An adapter run served as a lane of its own over `base`'s weights."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig.from_pretrained(folder)
    formatter = _formatter(folder, tok)
    model, weights = _adapted(base.model, folder, formatter, merge, strict=base.adapters == "merged",
                              in_place=in_place)
    lane = Lane(model, sorted(_stops(gen)), _pad(gen, tok), base.max_concurrency, base.context)
    return ServedModel(name, tok, gen, formatter, lane, str(folder),
                       format_for(formatter.template, spec.serve.tool_parser), weights)


def _copies_fit(base: Any, adapters: int) -> bool:
    from kubetune.serve.batching import available_bytes

    size = sum(p.numel() * p.element_size() for p in base.parameters())
    return adapters * size <= available_bytes(base.device) // 2


def _adapted(base: Any, folder: Path, formatter: ChatFormatter, merge: bool, strict: bool,
             in_place: bool) -> tuple[Any, str]:
    """(model with the adapter of `folder`, how); `base` itself is changed only `in_place` (it may be
    served too, or carry other adapters)."""
    import copy

    from peft import PeftModel

    from kubetune.hf import PARITY_PROBES, merge_with_parity

    if merge:
        peft = PeftModel.from_pretrained(base if in_place else copy.deepcopy(base), folder).eval()
        merged, parity = merge_with_parity(peft, [formatter.encode_prompt(p, None, True, "") for p in PARITY_PROBES])
        if parity.within(MERGE_TOLERANCE):
            return merged, f"LoRA merged in memory ({parity.describe()})"
        if strict or in_place:  # in place, the base weights are gone: no fall-back
            raise UsageError(f"{folder}: the adapter merged in memory differs from adapter-on-base ({parity.describe()}; "
                             f"more than {MERGE_TOLERANCE:g})", "serve it with --adapters unmerged")
        why = f"unmerged: merging changed the logits ({parity.describe()})"
    else:
        why = "unmerged, on the shared base weights"
    # A copy whose parameters and buffers are the base's own tensors: PEFT wraps the copy's layers,
    # the base stays as it is, and no weight is duplicated.
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    peft = PeftModel.from_pretrained(copy.deepcopy(base, shared), folder).eval()
    return peft.base_model.model, f"LoRA {why}"


def _stops(gen: Any) -> set[int]:
    eos = gen.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _pad(gen: Any, tok: Any) -> int | None:
    return gen.pad_token_id if gen.pad_token_id is not None else tok.pad_token_id


def _whole_model(folder: Path, name: str, max_concurrency: int, tool_parser: str = "auto",
                 workers: int | str = 1) -> TransformersEngine:
    """A model folder (a merged run, or any save_pretrained folder with a chat template), served as is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    _require_template(tok, str(folder))
    gen = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").exists() \
        else GenerationConfig.from_model_config(model.config)
    formatter = _formatter(folder, tok)
    context = _context(folder)
    lane = Lane(model, sorted(_stops(gen)), _pad(gen, tok), max_concurrency, context)
    served = ServedModel(name, tok, gen, formatter, lane, str(folder), format_for(formatter.template, tool_parser))
    return TransformersEngine([served], context, max_concurrency, workers)


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

