"""The base every LLM oracle builds on (:class:`ChatOracle`): the rate search's
(:class:`~.llm_oracle.LLMOracle`) and the metric search's (:mod:`.metric_oracle`).
"""

from __future__ import annotations

import time

from ..llm.chat import ChatRequest, OracleUnavailable, Reply, Transport
from ..storage.hashing import content_hash


class ChatOracle:
    """What every LLM oracle shares: the model and its transport, the request settings, the
    offspring that fill in for a step the model left short (``fallback``), ``strict``, and the
    counters (:meth:`accounting`). Subclasses build their own requests and parse their own replies."""

    fallback_name = "GA"

    def __init__(self, model: str, transport: Transport, fallback, reply_kinds: tuple[str, ...], backend: str = "openai",
                 temperature: float = 1.0, max_reasks: int = 2, json_mode: bool = True, max_tokens: int | None = None,
                 strict: bool = False, schema: bool = True) -> None:
        self.model = model
        self.transport = transport
        self.fallback = fallback
        self.backend = backend
        self.temperature = temperature
        self.max_reasks = max_reasks
        self.json_mode = json_mode
        self.max_tokens = max_tokens
        self.strict = strict
        self.schema = schema
        self.calls = 0
        self.fallbacks = 0
        self.duplicates = 0
        self.reasks = 0
        self.replies = dict.fromkeys(reply_kinds, 0)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.seconds = 0.0

    def accounting(self) -> dict:
        """Every counter, for best.json and the artifacts."""
        return {"calls": self.calls, "replies": dict(self.replies), "reasks": self.reasks, "fallbacks": self.fallbacks,
                "duplicates": self.duplicates, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "seconds": round(self.seconds, 3)}

    def _send(self, request: ChatRequest) -> Reply:
        """Send through the transport, counting the call, the re-ask, the tokens and the wait."""
        self.calls += 1
        self.reasks += request.attempt > 0
        start = time.perf_counter()
        reply = self.transport(request)
        self.seconds += time.perf_counter() - start
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens
        return reply

    def _unanswered(self, reply: Reply) -> bool:
        """Count a reply without text (late, or unreadable: invalid) and say so: the step then falls
        back at once, since asking again would queue behind a busy server or meet a broken one."""
        if reply.text is not None:
            return False
        self.replies["late" if reply.error is None else "invalid"] += 1
        return True

    def _seed(self, ctx, op: str, generation: int, attempt: int) -> int:
        return int(content_hash(ctx.seed, op, generation, attempt), 16) % 2**31

    def _fill(self, children: list) -> list:
        """Count the fallback's offspring (or, ``strict``, refuse to use them)."""
        if children and self.strict:
            raise OracleUnavailable(
                f"the oracle {self.model!r} left {len(children)} candidate(s) of a step without a valid reply "
                f"(invalid, refused, cut or late replies) and --oracle-strict forbids the {self.fallback_name} fallback: "
                "use a stronger model, raise --oracle-timeout / --oracle-max-tokens, or drop --oracle-strict"
            )
        self.fallbacks += len(children)
        return children
