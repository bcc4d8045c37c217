"""OpenAI request bodies (the fields kubetune honours; unknown ones are accepted and ignored, as
OpenAI-compatible servers do) and the OpenAI error body."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    stream_options: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]
    echo: bool = False

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a conversation (rendered with the chat template) or a raw prompt."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[Message] | None = None
    prompt: str | None = None
    add_generation_prompt: bool = True


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
