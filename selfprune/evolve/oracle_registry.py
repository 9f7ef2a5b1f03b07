"""The rate search's oracles by name (:data:`ORACLES`: ``ga``, ``random``, ``openai:MODEL``), and
how a command-line spec becomes an oracle (:func:`oracle_kind`, :func:`build_oracle`), which the
metric search's registry shares.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import UserError
from ..core.registry import Registry
from ..llm.chat import Transport
from ..llm.endpoint import OPENAI_URL
from ..llm.transport import openai_transport
from .classical import GAOracle, RandomOracle
from .llm_oracle import LLMOracle
from .search_context import Oracle


@dataclass(frozen=True)
class OracleKind:
    """A registered oracle: how it is written on the command line, and how it is built.

    ``usage`` is ``NAME`` or ``NAME:ARG`` (the spec then must carry an argument, such as the
    served model of ``openai:MODEL``). ``build(arg, base_url, transport, **options)`` returns the
    oracle (options it does not use are ignored).
    """

    usage: str
    build: Callable[..., Oracle]

    @property
    def takes_argument(self) -> bool:
        return ":" in self.usage


def openai_builder(oracle: Callable[..., Oracle]) -> Callable[..., Oracle]:
    """The ``build`` of an ``openai:MODEL`` kind: ``oracle(model, transport, backend=..., **options)``
    over the bounded OpenAI client (its key from ``api_key_env``, each request within ``timeout``),
    unless a ``transport`` replaces the network. The rate and the metric search share it."""

    def build(model: str, base_url: str | None, transport: Transport | None, api_key_env: str | None = None,
              timeout: float = 120.0, **options) -> Oracle:
        transport = transport or openai_transport(base_url, api_key_env, timeout)
        return oracle(model, transport, backend=f"openai@{base_url or OPENAI_URL}", **options)

    return build


ORACLES: Registry[OracleKind] = Registry("oracle")
ORACLES.register("ga", OracleKind("ga", lambda arg, base_url, transport, **_: GAOracle()))
ORACLES.register("random", OracleKind("random", lambda arg, base_url, transport, **_: RandomOracle()))
ORACLES.register("openai", OracleKind("openai:MODEL", openai_builder(LLMOracle)))


def oracle_kind(registry: Registry[OracleKind], spec: str) -> tuple[OracleKind, str]:
    """The registered kind a command-line spec (``NAME`` or ``NAME:ARG``) names, and its argument;
    a :class:`UserError` naming every usage when there is none, so a search checks its oracle
    before anything loads without building it."""
    name, colon, arg = spec.partition(":")
    kind = registry.get(name) if name in registry else None
    if kind is None or (not arg.strip() if kind.takes_argument else colon):
        choices = ", ".join(registry.get(n).usage for n in registry.names())
        raise UserError(
            f"unknown {registry.kind} {spec!r}; choose one of {choices} "
            "(e.g. openai:gpt-4o, or openai:<served model name> with a local vLLM/Ollama server's --base-url)"
        )
    return kind, arg.strip()


def build_oracle(registry: Registry[OracleKind], spec: str, base_url: str | None = None,
                 transport: Transport | None = None, **options):
    """Build an oracle of ``registry`` (:data:`ORACLES`, or the metric search's) from its
    command-line spec, ``NAME`` or ``NAME:ARG`` ("ga", "gp", "openai:MODEL", ...).

    ``base_url`` (public: no credentials) points "openai:MODEL" at a compatible server; it is part of
    the backend name, hence of every request's cache key. ``transport`` replaces the network (tests,
    caching); without it the LLM oracle's own takes ``api_key_env`` and ``timeout`` from ``options``.
    ``options`` go to the oracle (the LLM oracle's ``max_tokens`` and ``strict``; others ignore them).
    """
    kind, arg = oracle_kind(registry, spec)
    return kind.build(arg, base_url, transport, **options)


def make_oracle(spec: str, base_url: str | None = None, transport: Transport | None = None, **options) -> Oracle:
    """The rate search's oracle from its spec (:func:`build_oracle` on :data:`ORACLES`)."""
    return build_oracle(ORACLES, spec, base_url, transport, **options)
