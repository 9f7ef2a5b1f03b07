"""A real HTTP server that speaks just enough of the OpenAI chat-completions API for the tests.

Each request consumes the next behaviour of a script (the last one repeats once the script runs
out). It listens on 127.0.0.1 on a free port, serves from a thread, records every request it
receives, and stops on leaving the ``with`` block; slow behaviours wake up early when it stops.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Behaviour:
    """What to do with one request: an HTTP status, the reply text, and delays/headers."""

    status: int = 200
    content: str | None = ""
    delay: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    reject_response_format: bool = False
    reject_formats: tuple[str, ...] = ()  # response_format types answered with reject_status
    reject_status: int = 400
    finish_reason: str = "stop"


def reply(content: str | None) -> Behaviour:
    """A 200 chat completion whose message content is ``content`` (None: a null content)."""
    return Behaviour(content=content)


def status(code: int, retry_after_ms: int | None = None) -> Behaviour:
    headers = (("retry-after-ms", str(retry_after_ms)),) if retry_after_ms is not None else ()
    return Behaviour(status=code, headers=headers)


def slow(seconds: float, content: str) -> Behaviour:
    return Behaviour(content=content, delay=seconds)


def no_json_mode(content: str) -> Behaviour:
    """HTTP 400 if the request asks for ``response_format``; otherwise reply with ``content``."""
    return Behaviour(content=content, reject_response_format=True)


def like_llama_cpp_python(content: str) -> Behaviour:
    """llama-cpp-python's server: ``json_schema`` is an HTTP 500; ``json_object`` (with a schema) works."""
    return Behaviour(content=content, reject_formats=("json_schema",), reject_status=500)


def cut(content: str) -> Behaviour:
    """A reply that hit ``max_tokens``: ``finish_reason`` is "length"."""
    return Behaviour(content=content, finish_reason="length")


@dataclass
class Received:
    path: str
    body: dict
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased


class FakeOpenAI:
    """``with FakeOpenAI([reply(...), status(500)]) as server: ... server.base_url ...``"""

    def __init__(self, script: list[Behaviour]) -> None:
        if not script:
            raise ValueError("the script needs at least one behaviour")
        self.script = list(script)
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next(self, received: Received) -> Behaviour:
        with self._lock:
            self.requests.append(received)
            return self.script[min(len(self.requests), len(self.script)) - 1]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                if self.path not in ("/v1/chat/completions", "/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                behaviour = fake._next(Received(self.path, body, {k.lower(): v for k, v in self.headers.items()}))
                if behaviour.delay and fake._stop.wait(behaviour.delay):
                    return
                kind = (body.get("response_format") or {}).get("type")
                if behaviour.reject_response_format and "response_format" in body:
                    self._send(400, {"error": {"message": "response_format is not supported", "type": "invalid_request_error"}})
                elif kind in behaviour.reject_formats:
                    self._send(behaviour.reject_status,
                               {"error": {"message": "Input should be 'text' or 'json_object'", "type": "server_error"}})
                elif behaviour.status != 200:
                    self._send(
                        behaviour.status,
                        {"error": {"message": f"scripted {behaviour.status}", "type": "server_error"}},
                        behaviour.headers,
                    )
                else:
                    self._send(200, _completion(body.get("model", "fake"), behaviour.content, behaviour.finish_reason))

            def _send(self, code: int, payload: dict, headers: tuple[tuple[str, str], ...] = ()) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in headers:
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before the reply

        return Handler


def _completion(model: str, content: str | None, finish_reason: str = "stop") -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason, "logprobs": None}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
