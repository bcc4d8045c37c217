"""Chat with a model: over HTTP with the `openai` client (kubetune's server, vLLM, any
OpenAI-compatible URL), or in-process with a run's model. Both stream text deltas."""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Iterator, Protocol, Sequence

from kubetune.errors import KubetuneError, UsageError

Messages = Sequence[dict[str, str]]


class ChatBackend(Protocol):
    model: str

    def stream(self, messages: Messages, max_tokens: int) -> Iterator[str]: ...


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


class HttpChat:
    def __init__(self, url: str, model: str | None = None, api_key: str | None = None) -> None:
        import openai

        base = url.rstrip("/")
        base = base if base.endswith("/v1") else base + "/v1"
        self.url = base
        self._client = openai.OpenAI(base_url=base, api_key=api_key or "none", max_retries=0, timeout=600)
        self._errors = openai
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        with self._translate():
            models = [m.id for m in self._client.models.list()]
        if not models:
            raise KubetuneError(f"{self.url}/models lists no model", "check the server's logs")
        return models[0]

    def stream(self, messages: Messages, max_tokens: int) -> Iterator[str]:
        with self._translate():
            chunks = self._client.chat.completions.create(model=self.model, messages=list(messages),  # type: ignore[arg-type]
                                                          max_tokens=max_tokens, temperature=0, stream=True)
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    def _translate(self) -> contextlib.AbstractContextManager[None]:
        return _translate(self.url, self._errors)


@contextlib.contextmanager
def _translate(url: str, errors: Any) -> Iterator[None]:
    """openai's exceptions → kubetune errors that say which URL and what to do."""
    try:
        yield
    except errors.APIConnectionError:
        raise UsageError(f"cannot reach {url}", "is the server running? (kubetune serve RUN)") from None
    except errors.AuthenticationError:
        raise UsageError(f"{url}: the server wants an API key",
                         "pass --api-key or set KUBETUNE_API_KEY / OPENAI_API_KEY") from None
    except errors.APIStatusError as exc:
        raise KubetuneError(f"{url}: HTTP {exc.status_code}: {_message(exc)}") from None


def _message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(exc)


class LocalChat:
    """A run's model in this process (no server): the same engine `kubetune serve` uses."""

    def __init__(self, run: str, base: bool = False) -> None:
        from kubetune.serve.engine import load_engine

        self._engine = load_engine([run], with_base=True, max_concurrency=1)
        names = self._engine.names
        self.model = names[-1] if base and len(names) > 1 else names[0]

    def stream(self, messages: Messages, max_tokens: int) -> Iterator[str]:
        from kubetune.serve.engine import GenerationParams, iter_text

        ids_out: queue.Queue[list[int] | None] = queue.Queue()
        prompt = self._engine.encode_chat(self.model, messages)
        params = GenerationParams(max_tokens=max_tokens, temperature=0)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self._engine.generate(self.model, prompt, params, ids_out.put)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
            finally:
                ids_out.put(None)

        threading.Thread(target=work, daemon=True).start()
        ids: list[int] = []
        text = ""
        while (item := ids_out.get()) is not None:
            ids.extend(item)
            delta, text = iter_text(lambda x: self._engine.decode(self.model, x), ids, text)
            if delta:
                yield delta
        if failure:
            raise failure[0]


def backend_for(target: str, model: str | None = None, api_key: str | None = None, base: bool = False) -> ChatBackend:
    if is_url(target):
        return HttpChat(target, model, api_key)
    return LocalChat(target, base=base)


def stream_answer(backend: ChatBackend, messages: Messages, max_tokens: int,
                  write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> str:
    """Stream one answer to `write` as it comes; the whole answer."""
    parts = []
    for delta in backend.stream(messages, max_tokens):
        parts.append(delta)
        write(delta)
    write("\n")
    return "".join(parts)


def converse(backend: ChatBackend, system: Messages, max_tokens: int, read: Callable[[str], str] = input,
             write: Callable[[str], None] = lambda s: print(s, end="", flush=True), tty: bool = False) -> None:
    """An interactive conversation that keeps its history; an empty line or EOF (Ctrl-D) ends it."""
    if tty:
        write(f"chatting with {backend.model} (empty line or Ctrl-D to quit)\n")
    history = list(system)
    while True:
        try:
            line = read("you> " if tty else "")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        if tty:
            write(f"{backend.model}> ")
        history.append({"role": "assistant", "content": stream_answer(backend, history, max_tokens, write)})
