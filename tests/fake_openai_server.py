"""A real HTTP server that speaks just enough of the OpenAI chat-completions API for the tests.

Each request consumes the next behaviour of a script (the last one repeats once the script runs
out). It listens on 127.0.0.1 on a free port, serves from a thread, records every request it
receives, and stops on leaving the ``with`` block; slow behaviours wake up early when it stops.

Hostile behaviours, as a server someone else runs might answer: any raw body (:func:`raw`: HTML
with status 200, invalid UTF-8, deeply nested JSON), a response trickled a byte at a time
(:func:`trickle`), any ``retry-after`` header (:func:`status`).
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
    body: bytes | None = None  # sent as-is (with ``content_type``) instead of a chat completion
    content_type: str = "application/json"
    trickle: float = 0.0  # seconds between bytes of the whole response, status line included


def reply(content: str | None) -> Behaviour:
    """A 200 chat completion whose message content is ``content`` (None: a null content)."""
    return Behaviour(content=content)


def status(code: int, retry_after_ms: int | None = None, retry_after: str | None = None) -> Behaviour:
    """An error status, with the ``retry-after-ms`` and ``retry-after`` headers when given (any text)."""
    headers = (("retry-after-ms", str(retry_after_ms)),) if retry_after_ms is not None else ()
    headers += (("retry-after", retry_after),) if retry_after is not None else ()
    return Behaviour(status=code, headers=headers)


def raw(body: bytes, content_type: str = "application/json") -> Behaviour:
    """A 200 whose body is ``body`` exactly, whatever it holds."""
    return Behaviour(body=body, content_type=content_type)


def trickle(seconds_per_byte: float, content: str) -> Behaviour:
    """A valid completion holding ``content``, sent one byte every ``seconds_per_byte``."""
    return Behaviour(content=content, trickle=seconds_per_byte)


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
    query: str = ""  # the URL's query string, as sent


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
                path, _, query = self.path.partition("?")
                if path not in ("/v1/chat/completions", "/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {path}", "type": "not_found"}})
                    return
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                behaviour = fake._next(Received(path, body, headers, query))
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
                elif behaviour.body is not None:
                    self._send(200, behaviour.body, content_type=behaviour.content_type)
                else:
                    completion = _completion(body.get("model", "fake"), behaviour.content, behaviour.finish_reason)
                    self._send(200, completion, trickle=behaviour.trickle)

            def _send(self, code: int, payload: dict | bytes, headers: tuple[tuple[str, str], ...] = (),
                      content_type: str = "application/json", trickle: float = 0.0) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                head = [f"{self.protocol_version} {code} {self.responses.get(code, ('',))[0]}", f"content-type: {content_type}",
                        f"content-length: {len(data)}", *(f"{name}: {value}" for name, value in headers)]
                message = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data
                try:
                    if not trickle:
                        self.wfile.write(message)
                        return
                    for i in range(len(message)):
                        if fake._stop.wait(trickle):
                            return
                        self.wfile.write(message[i:i + 1])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout, or a bound on what it reads) before the reply

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
