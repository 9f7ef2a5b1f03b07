"""One exchange with a chat model: the request (its own cache key), the reply, the transport
that carries one to the other, and the fault raised when the server cannot be used at all.

The LLM oracles (:mod:`.chat_oracle`) build requests; a transport (:mod:`.transport` over the
network, or the orchestrator's cache, or a test's script) answers them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..core.errors import EnvironmentFault


class OracleUnavailable(EnvironmentFault):
    """The oracle's server could not be used (down, refused us, its replies unusable) after all retries.

    An :class:`EnvironmentFault` (exit 3: the server, not the input): the message says what failed
    and how to fix it, and the generation that needed the oracle fails cleanly instead of silently
    searching with something else.
    """


@dataclass(frozen=True)
class ChatRequest:
    """One chat-completion call, complete enough to be its own cache key.

    ``attempt`` is not sent to the server; it numbers the re-asks of one question so that each
    has its own key (and its own ``seed``) instead of replaying the cached first answer.
    """

    backend: str
    model: str
    messages: tuple[tuple[str, str], ...]
    temperature: float
    seed: int
    attempt: int
    json_mode: bool
    max_tokens: int | None = None
    schema: str | None = None  # the reply's JSON Schema, as canonical JSON (hashable, part of the key)

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.model,
            "messages": self.api_messages(),
            "temperature": self.temperature,
            "seed": self.seed,
            "attempt": self.attempt,
            "json_mode": self.json_mode,
            "max_tokens": self.max_tokens,
            "schema": self.schema,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ChatRequest:
        return cls(**{**d, "messages": tuple((m["role"], m["content"]) for m in d["messages"])})

    def response_formats(self) -> list[dict | None]:
        """The ways to ask for this reply's shape, most constrained first: a JSON Schema as OpenAI,
        vLLM, Ollama and llama.cpp's server take it; as llama-cpp-python takes it; plain JSON mode;
        nothing (the reply parser copes with prose)."""
        if not self.json_mode:
            return [None]
        schema = json.loads(self.schema) if self.schema else None
        tried: list[dict | None] = []
        if schema is not None:
            tried += [{"type": "json_schema", "json_schema": {"name": "candidates", "schema": schema}},
                      {"type": "json_object", "schema": schema}]
        return tried + [{"type": "json_object"}, None]

    def api_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Reply:
    """What a server sent back: the text (None: no answer within the timeout, or ``error`` says
    why what came could not be read), why generation stopped ("length": cut at ``max_tokens``), and
    the token counts of the server's ``usage``. A reply without text is never replayed from the
    cache: a rerun asks again."""

    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Reply:
        return cls(**d)


# A transport sends one request and returns its Reply. It raises OracleUnavailable only when the
# server cannot be used at all (unreachable, key refused, model unknown, errors past the retries).
Transport = Callable[[ChatRequest], Reply]
