"""OpenAI request bodies (the fields kubetune honours; unknown ones are accepted and ignored, as
OpenAI-compatible servers do).

Chat messages are converted by the same code that reads training files (`data.formats`), so a
conversation with tools and tool calls reaches the chat template in the shape training gave it."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubetune.data.formats import chat_message
from kubetune.serve.errors import ApiError


MAX_CHOICES = 8  # choices a request may ask for (each is a request of its own in the batch)
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # OpenAI allows 4 stop strings; vLLM users pass a few more


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    # a 64-bit seed (the sampler's generator takes no more: beyond it was a 500); choice i uses seed + i
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None
    # Log probabilities are not returned by this engine: asked for, they are a 400 on the field rather
    # than an answer without them that an evaluation script would read as missing data.
    logprobs: Union[bool, int, None] = None
    top_logprobs: int | None = None

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, value: Any) -> Any:
        # every stop string is looked for in the answer at each step, on the server's event loop
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value:
            raise ValueError("this server does not return log probabilities; leave logprobs and top_logprobs "
                             "out (vLLM serving, `kubetune deploy`, returns them)")
        return value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class _Function(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: _Function


def conversation(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's messages as chat templates take them; a 400 naming the message otherwise."""
    out = []
    for i, message in enumerate(messages):
        converted = chat_message(message, f"messages[{i}]")
        if isinstance(converted, str):
            raise ApiError(400, converted, param=f"messages[{i}]")
        out.append(converted)
    return out


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    stream_options: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        return conversation(self.messages)

    def tool_list(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def forced_function(self) -> str | None:
        """tool_choice {"type": "function", "function": {"name": ...}}: that name (checked against tools)."""
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return None
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": ...}}', param="tool_choice")
        if name not in {t.function.name for t in self.tools or []}:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools", param="tool_choice")
        return name

    @property
    def choice(self) -> str:
        """none, auto, required or function (tool_choice's default: auto with tools, none without)."""
        if isinstance(self.tool_choice, dict):
            return "function"
        if self.tool_choice in ("required", "auto") and not self.tools:
            raise ApiError(400, f"tool_choice {self.tool_choice!r} needs tools", param="tool_choice")
        return self.tool_choice or ("auto" if self.tools else "none")


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: bool = False

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a conversation (rendered with the chat template) or a raw prompt."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True
