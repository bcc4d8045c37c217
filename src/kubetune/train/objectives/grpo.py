"""GRPO through TRL's GRPOTrainer: prompts from the data, rewards from method.grpo.rewards, answers
sampled in groups of num_generations — by transformers here (CPU included) or by vLLM where TRL runs
it (colocated, on GPUs). The prompt is rendered by the run's chat template. The reference model
(beta > 0) is the starting model (LoRA: the adapter disabled).

Eval: the eval prompts are answered by the starting model (before the first step), every
eval_every_steps steps where set, and by the tuned one (after the last), eval_generations samples each
(default num_generations) as in training, from a fixed seed; the mean reward, in total, per function
and per sub-grader, goes into eval events, the trackers and eval/report.md."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

from kubetune.runs.layout import RunLayout
from kubetune.data.prompts import PromptData, PromptRow, prepare_prompts
from kubetune.errors import DataError, Problem, SpecError, capped
from kubetune.spec.models import RunSpec
from kubetune.train.objectives import BaseObjective

# OpenAI's reinforcement fine-tuning samples this many answers per prompt at compute_multiplier 1
OPENAI_GROUP = 4


class GRPO(BaseObjective):
    name = "grpo"
    openai_method = "reinforcement"

    def reference_copy(self, spec: RunSpec, method: str) -> bool:
        return method == "full" and spec.method.grpo.beta > 0

    def memory_notes(self, spec: RunSpec, plan: Any, seq_len: int, kv_bytes_per_token: int) -> list[str]:
        from kubetune.train.memory import size_text

        g = spec.method.grpo
        cache = kv_bytes_per_token * (seq_len + g.max_new_tokens) * plan.micro_batch
        return [f"grpo: a micro-batch is {plan.micro_batch} answers ({g.num_generations} per prompt); generating "
                f"them holds a KV cache of ~{size_text(cache)}"
                + (", plus the reference model's forward pass (beta > 0)" if g.beta else "")]

    def answers_per_row(self, spec: RunSpec) -> int:
        return spec.method.grpo.num_generations  # the batch counts answers: num_generations per prompt

    def tokens_per_row(self, spec: RunSpec) -> int:
        return spec.data.max_length + spec.method.grpo.max_new_tokens

    def held_out_passes(self, spec: RunSpec, steps: int) -> tuple[str, int, int] | None:
        """Scoring before the first step, every eval_every_steps, after the last; eval_generations each."""
        g = spec.method.grpo
        scorings = steps // g.eval_every_steps if g.eval_every_steps else 0
        return "method.grpo.eval_every_steps", scorings, (scorings + 1) * (g.eval_generations or g.num_generations)

    def openai_hyperparameters(self, spec: RunSpec) -> dict[str, Any]:
        g = spec.method.grpo
        return {"batch_size": spec.train.total_batch_size // g.num_generations,
                "eval_interval": g.eval_every_steps or "auto", "eval_samples": g.eval_generations or g.num_generations,
                "compute_multiplier": round(g.num_generations / OPENAI_GROUP, 6),
                "reasoning_effort": g.reasoning_effort or "default"}

    def show(self, spec: RunSpec, data: Any, rows: list[Any], color: bool) -> list[Any]:
        g = spec.method.grpo
        out: list[Any] = [f"  {g.num_generations} answers per prompt (up to {g.max_new_tokens} tokens, temperature "
                          f"{g.temperature}); rewards: " + ", ".join(f"{r.function} x{r.weight:g}" for r in g.rewards)]
        for row in rows:
            out += [f"\nprompt ({row.where}; columns for the rewards: {', '.join(sorted(row.columns)) or 'none'}):",
                    data.formatter.decode(data.formatter.encode_prompt(row.prompt))]
        return out

    def sample_json(self, data: Any, rows: list[Any]) -> list[str]:
        return [json.dumps({"where": row.where, "prompt": data.formatter.decode(data.formatter.encode_prompt(
            row.prompt)), "columns": row.columns}, ensure_ascii=False) for row in rows]

    def prepare(self, spec: RunSpec) -> PromptData:
        from kubetune.train.rewards import load_rewards

        # an import path that does not resolve, a grader that does not load: validate fails, not step 0
        funcs, _ = load_rewards(spec.method.grpo.rewards, spec.method.grpo.sandbox, spec.method.grpo.judges,
                                spec.method.grpo.embeddings)
        data = prepare_prompts(spec)
        _check_graded_columns(funcs, data)
        if spec.method.grpo.reasoning_effort and "reasoning_effort" not in (data.formatter.template or ""):
            raise SpecError([Problem("method.grpo.reasoning_effort", "the model's chat template does not read "
                                     "reasoning_effort (gpt-oss's does)")], "leave it out for this model")
        return data

    def arguments(self, spec: RunSpec) -> tuple[Any, dict[str, Any]]:
        from trl import GRPOConfig

        g = spec.method.grpo
        return GRPOConfig, {
            "num_generations": g.num_generations, "max_completion_length": g.max_new_tokens,
            "temperature": g.temperature, "beta": g.beta, "use_vllm": use_vllm(spec),
            "vllm_mode": "colocate", "reward_weights": [r.weight for r in g.rewards],
            "eval_strategy": "no",  # the eval prompts are scored by kubetune, before and after (see evaluate)
            "log_completions": False, "chat_template_kwargs": _template_kwargs(spec),
        }

    def trainer(self, spec: RunSpec, data: PromptData, model: Any, args: Any, batches: Any,
                callbacks: list[Any]) -> Any:
        from kubetune.train.rewards import load_rewards

        funcs, weights = load_rewards(spec.method.grpo.rewards, spec.method.grpo.sandbox, spec.method.grpo.judges,
                                      spec.method.grpo.embeddings)
        tokenizer = _tokenizer(data)
        # TRL stops a generation at the model's eos ids: make them the template's end of turn, or every
        # answer runs on into a next turn and fails any format check
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.generation_config.eos_token_id = list(data.formatter.stop.fixed_eos_ids)
        scorer = _score_callback(spec, data, tokenizer, funcs, weights)
        trainer = _trainer_class()(model=model, reward_funcs=funcs, args=args, train_dataset=_dataset(data.train.rows),
                                   processing_class=tokenizer, callbacks=[*callbacks, scorer])
        scorer.trainer = trainer
        trainer.kubetune_rewards = (funcs, weights)
        return trainer

    def evaluate(self, spec: RunSpec, trainer: Any, data: PromptData, layout: RunLayout, main: bool) -> None:
        if not data.eval.rows:
            return
        tuned = score(spec, trainer.model, _tokenizer(data), data, *trainer.kubetune_rewards)
        start = _start_scores(layout)
        _log_scores(trainer, {f"eval_{k}": v for k, v in tuned.items()})
        if main:
            write_report(layout, start, tuned, len(data.eval.rows))


def use_vllm(spec: RunSpec) -> bool:
    choice = spec.method.grpo.generation
    if choice == "transformers":
        return False
    import torch

    ready = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if choice == "vllm" and not ready:
        from kubetune.errors import UsageError

        raise UsageError("method.grpo.generation vllm needs a CUDA GPU with vllm installed",
                         "use method.grpo.generation: auto (transformers here)")
    return ready


def _tokenizer(data: PromptData) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(data.model_dir)
    tokenizer.chat_template = data.formatter.template  # TRL renders prompts with the run's template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = data.formatter.pad_id
    return tokenizer


def _dataset(rows: list[PromptRow]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{**r.columns, "prompt": [dict(m) for m in r.prompt]} for r in rows])


def _trainer_class() -> Any:
    from trl import GRPOTrainer

    from kubetune.train.trainer import KubetuneMixin

    class KubetuneGRPOTrainer(KubetuneMixin, GRPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kubetune_init()

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            # the generated batch: prompt and answer tokens (masks) are what this step trained on
            for key in ("prompt_mask", "completion_mask"):
                if isinstance(inputs, dict) and key in inputs:
                    self.count_tokens(inputs[key])
            return super().compute_loss(model, inputs, *args, **kwargs)

    return KubetuneGRPOTrainer


def score(spec: RunSpec, model: Any, tokenizer: Any, data: PromptData, funcs: list[Any], weights: list[float]
          ) -> dict[str, float]:
    """The policy's mean reward on the eval prompts — weighted total, per function, and each grader's
    sub-scores and error rates — over method.grpo.eval_generations answers per prompt (default
    num_generations) sampled as in training (method.grpo.temperature), from a fixed seed, so the
    starting and the tuned model are measured alike."""
    import torch

    g = spec.method.grpo
    rows = [r for r in data.eval.rows for _ in range(g.eval_generations or g.num_generations)]
    answers = _answers(model, tokenizer, data, [r.prompt for r in rows], g.max_new_tokens, g.temperature,
                       spec.train.seed, _template_kwargs(spec))
    columns = {k: [r.columns.get(k) for r in rows] for k in {k for r in rows for k in r.columns}}
    prompts = [list(r.prompt) for r in rows]
    logged: dict[str, list[float]] = {}

    def log_metric(name: str, value: float) -> None:
        logged.setdefault(name, []).append(value)

    per = {f.__name__: torch.tensor(f(prompts=prompts, completions=answers, log_metric=log_metric, **columns),
                                    dtype=torch.float64) for f in funcs}
    total = sum(w * v for w, v in zip(weights, per.values()))
    return {"reward": float(total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in per.items()},
            **{k: sum(v) / len(v) for k, v in logged.items()}}


def _template_kwargs(spec: RunSpec) -> dict[str, Any]:
    effort = spec.method.grpo.reasoning_effort
    return {"reasoning_effort": effort} if effort else {}


def _check_graded_columns(funcs: list[Any], data: PromptData) -> None:
    """Every row has the columns the graders' templates read ({{item.COLUMN}}), else file:line."""
    from kubetune.train.rewards import GraderReward, grader_columns

    needed = sorted({c for f in funcs if isinstance(f, GraderReward) for c in grader_columns(f.grader)})
    problems = [Problem(r.where, f"missing column {c!r} (a grader reads {{{{item.{c}}}}})")
                for r in [*data.train.rows, *data.eval.rows] for c in needed if c not in r.columns]
    if problems:
        raise DataError(capped(problems), "add the column to every row, or change the grader's template")


def _answers(model: Any, tokenizer: Any, data: PromptData, prompts: list[tuple[dict[str, Any], ...]],
             max_new_tokens: int, temperature: float, seed: int, template_kwargs: dict[str, Any],
             batch: int = 16) -> list[str]:
    import torch

    stop = data.formatter.stop.fixed_eos_ids
    was_training = model.training
    model.eval()
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same draws for the starting and the tuned model; training's RNG untouched
    tokenizer.padding_side = "left"
    out: list[str] = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True, **template_kwargs)
                 for p in prompts[i:i + batch]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, eos_token_id=list(stop), pad_token_id=tokenizer.pad_token_id)
        out += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids[:, enc["input_ids"].shape[1]:]]
    torch.random.set_rng_state(rng_state)
    if was_training:
        model.train()
    return out


def _score_callback(spec: RunSpec, data: PromptData, tokenizer: Any, funcs: list[Any], weights: list[float]) -> Any:
    """Scores the eval prompts with the starting model before the first step (not again on resume),
    and every method.grpo.eval_every_steps steps (eval_reward at that step)."""
    from transformers import TrainerCallback

    every = spec.method.grpo.eval_every_steps

    class ScoreCallback(TrainerCallback):
        trainer: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step or not data.eval.rows:
                return
            scores = score(spec, self.trainer.model, tokenizer, data, funcs, weights)
            _log_scores(self.trainer, {f"eval_{k}_start": v for k, v in scores.items()})

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not every or not data.eval.rows or state.global_step % every or state.global_step >= state.max_steps:
                return  # the last step is scored by evaluate
            scores = score(spec, self.trainer.model, tokenizer, data, funcs, weights)
            _log_scores(self.trainer, {f"eval_{k}": v for k, v in scores.items()})

    return ScoreCallback()


def _log_scores(trainer: Any, logs: dict[str, float]) -> None:
    """Log held-out scores as they are: GRPOTrainer.log would fold the training metrics gathered since
    the last logging step into them (and clear them, so the step's own log would lack its reward); and
    logging turns off should_log, which the step's own log (after on_step_end) still needs."""
    from transformers import Trainer

    should_log = trainer.control.should_log
    Trainer.log(trainer, logs)
    trainer.control.should_log = should_log


def _start_scores(layout: RunLayout) -> dict[str, float]:
    from kubetune.artifacts.events import read_events

    for event in reversed(read_events(layout.events)):
        if event.event == "eval" and "reward_start" in (event.metrics or {}):
            return {k.removesuffix("_start"): v for k, v in event.metrics.items() if k.endswith("_start")}
    return {}


def write_report(layout: RunLayout, start: dict[str, float], tuned: dict[str, float], prompts: int) -> None:
    layout.eval.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"| {k} | {start.get(k, float('nan')):.3f} | {v:.3f} |\n" for k, v in tuned.items())
    layout.eval_report.write_text(
        f"# Reward evaluation\n\n{prompts} held-out prompts, each answered num_generations times (sampled as in "
        "training, from a fixed seed) by the starting model (before the first step) and by the tuned model.\n\n| mean reward | start | tuned |\n| --- | ---: | ---: |\n" + rows)
    layout.eval_metrics.write_text(json.dumps({"start": start, "tuned": tuned}, indent=2))
