"""A judge model for model graders' tests: an OpenAI-compatible /v1/chat/completions server on
127.0.0.1 (HTTP, as vLLM or `kubetune serve` answer it), whose "model" is a rule a test can predict —
a tiny random model's judgement could not be — so the scores the graders report can be checked. It
also serves /v1/embeddings (letter counts) for the cosine metric.

It reads the conversation's text for `Answer: X` and `Reference: Y` lines and judges X == Y: a
score_model request (response_format's result is a number) gets 1 or 0 (`scale` times), a
label_model request (an enum) gets its first label when they match, else its second. `mode` makes it
answer as broken judges do; every request is recorded with its Authorization header.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def letter_counts(text: str) -> list[float]:
    """The embedding model's vector: how often each letter a-z occurs (a cosine a test can compute)."""
    return [float(text.lower().count(c)) for c in "abcdefghijklmnopqrstuvwxyz"]


class Judge:
    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.mode = "json"   # json | bare | prose | refuse | error | slow | out_of_range | not_json | number_content
        self.scale = 1.0
        self.requests: list[dict[str, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def verdict(self, body: dict[str, Any]) -> Any:
        text = "\n".join(m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"])
                         for m in body["messages"])
        answer = re.search(r"Answer: *(.*)", text)
        reference = re.search(r"Reference: *(.*)", text)
        same = bool(answer and reference and answer.group(1).strip() == reference.group(1).strip())
        wanted = body["response_format"]["json_schema"]["schema"]["properties"]["result"]
        if "enum" in wanted:
            return wanted["enum"][0 if same else 1]
        return self.scale * float(same) + (5.0 if self.mode == "out_of_range" else 0.0)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if judge.key and self.headers.get("Authorization") != f"Bearer {judge.key}":
                    return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                if self.path == "/v1/embeddings" and judge.mode != "error":
                    vectors = [letter_counts(t) for t in body["input"]]
                    return self._send(200, {"object": "list", "model": body["model"], "usage": {
                        "prompt_tokens": 1, "total_tokens": 1}, "data": [
                        {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]})
                if self.path != "/v1/chat/completions" or judge.mode == "error":
                    return self._send(503, {"error": {"message": "overloaded", "type": "server_error"}})
                if judge.mode == "slow":
                    time.sleep(3)
                if judge.mode == "not_json":
                    data = b"<html>502 Bad Gateway</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                value = judge.verdict(body)
                content: str | None = {"json": json.dumps({"result": value}), "bare": str(value),
                                       "prose": "I think it is quite good."}.get(judge.mode, json.dumps({"result": value}))
                refusal = "I cannot grade this." if judge.mode == "refuse" else None
                if judge.mode == "number_content":
                    content = value  # type: ignore[assignment]
                message = {"role": "assistant", "content": None if refusal else content, "refusal": refusal}
                usage = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None} \
                    if judge.mode == "number_content" else \
                    {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
                self._send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                                 "model": body["model"], "choices": [{"index": 0, "message": message,
                                                                      "finish_reason": "stop"}],
                                 "usage": usage})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (the slow mode's point)

        return Handler
