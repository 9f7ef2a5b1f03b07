"""Oracles: whoever proposes candidate rate vectors for the evolutionary search.

Self-Pruner's oracle is an LLM doing initialization, selection, crossover and mutation from the
paper's prompts (:class:`LLMOracle`). :class:`GAOracle` does the same jobs with classical operators
and :class:`RandomOracle` with none; they are baselines, the random-initialization ablation, and
the fallback when an LLM does not deliver enough valid candidates.

Every oracle keeps the same contract, so the search loop never has to check: each returned vector
has ``ctx.n_layers`` entries in ``[0, ctx.p_max]`` with mean ``ctx.beta`` (within 1e-6), and no two
returned vectors, nor a returned vector and a member of the given population, share a
``ctx.canonical`` key. An oracle returns fewer vectors than asked only when it cannot find enough
distinct ones (a tiny search space).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Protocol, TypeVar

from ..allocation import project_to_mean
from ..errors import EnvironmentFault, UserError
from ..hashing import content_hash, stable_json
from ..registry import Registry
from . import prompts
from .endpoint import MAX_REPLY_BYTES, OPENAI_URL, ReplyRefused, api_key, bounded_client, credentials, missing_key, request_bounds
from .replies import parse_candidates, repair

logger = logging.getLogger("selfprune.oracle")

Scored = tuple[list[float], float]

# How many draws per wanted child before giving up on finding a new distinct one.
_TRIES_PER_CHILD = 50


class OracleUnavailable(EnvironmentFault):
    """The oracle's server could not be used (down, refused us, its replies unusable) after all retries.

    An :class:`EnvironmentFault` (exit 3: the server, not the input): the message says what failed
    and how to fix it, and the generation that needed the oracle fails cleanly instead of silently
    searching with something else.
    """


def rounded_key(rates: list[float]) -> tuple[float, ...]:
    """Default candidate identity: rates rounded to the 5 decimals the prompts ask for."""
    return tuple(round(r, 5) for r in rates)


@dataclass(frozen=True)
class SearchContext:
    """What every oracle needs to know about the problem.

    ``p_max`` bounds each layer's rate. It defaults to 0.9 rather than the paper's 1 because a
    rate of 1 removes a layer's attention and MLP entirely; the bound keeps every layer alive.
    ``canonical`` maps rates to the pruned structure they produce (the orchestrator passes the
    rounding to whole heads and channels), so two vectors that prune the same units count as one
    candidate. ``dataset`` names the fitness data in the prompt. ``baselines``: known allocations
    at ``beta`` by name, which join the initial population and which the LLM sees, labelled.
    """

    model_name: str
    n_layers: int
    beta: float
    p_max: float = 0.9
    seed: int = 0
    canonical: Callable[[list[float]], Hashable] = rounded_key
    dataset: str = "WikiText-2"
    baselines: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise UserError(f"the model must have at least one layer to prune (got n_layers={self.n_layers})")
        if not 0.0 < self.p_max <= 1.0:
            raise UserError(f"p_max must lie in (0, 1] (got {self.p_max}); e.g. 0.9")
        if not 0.0 < self.beta <= self.p_max:
            raise UserError(f"the target ratio {self.beta} must lie in (0, p_max={self.p_max}]: lower the ratio or raise p_max")


class Oracle(Protocol):
    """Proposes candidates; see the module docstring for the contract on what it returns."""

    def initialize(self, ctx: SearchContext, k: int) -> list[list[float]]:
        """The initial population: ``k`` distinct feasible vectors."""
        ...

    def evolve(
        self, ctx: SearchContext, population: list[Scored], n_crossover: int, n_mutation: int, generation: int
    ) -> list[list[float]]:
        """Offspring of ``population`` (rates, perplexity; lower is better): mutants then crossovers."""
        ...


def rng_for(ctx, generation: int, op: str) -> random.Random:
    """A generator that depends only on (seed, generation, operation): same inputs, same outputs."""
    return random.Random(int(content_hash(ctx.seed, generation, op), 16))


def _distinct(ctx: SearchContext, make: Callable[[], list[float]], n: int, exclude: set[Hashable]) -> list[list[float]]:
    """Draw from ``make`` until ``n`` vectors with new canonical keys are found (or tries run out).

    ``exclude`` is updated with the keys taken, so successive calls never repeat each other.
    """
    out: list[list[float]] = []
    for _ in range(_TRIES_PER_CHILD * n):
        if len(out) == n:
            break
        rates = make()
        key = ctx.canonical(rates)
        if key not in exclude:
            exclude.add(key)
            out.append(rates)
    return out


def _random_rates(rng: random.Random, ctx: SearchContext) -> list[float]:
    """Uniform rates in the widest interval centred on beta that fits the bounds, projected."""
    half = min(ctx.beta, ctx.p_max - ctx.beta)
    raw = [rng.uniform(ctx.beta - half, ctx.beta + half) for _ in range(ctx.n_layers)]
    return project_to_mean(raw, ctx.beta, ctx.p_max)


def fitness_key(fitness: float) -> tuple[bool, float]:
    """Sort key: lower perplexity first; NaN (a broken candidate) after everything, inf included."""
    return (math.isnan(fitness), fitness)


Member = TypeVar("Member")


def tournament(rng: random.Random, population: list[tuple[Member, float]], size: int) -> Member:
    """Tournament selection, the GA's and the GP's: the fittest of ``size`` members drawn with
    replacement (:func:`fitness_key` order: a broken member, NaN, loses)."""
    if not population:
        raise ValueError("evolution needs a non-empty scored population")
    entrants = [population[rng.randrange(len(population))] for _ in range(size)]
    return min(entrants, key=lambda s: fitness_key(s[1]))[0]


class RandomOracle:
    """No prior and no inheritance: fresh random vectors every time (the random-init ablation)."""

    def initialize(self, ctx: SearchContext, k: int) -> list[list[float]]:
        rng = rng_for(ctx, 0, "random-init")
        return _distinct(ctx, lambda: _random_rates(rng, ctx), k, set())

    def evolve(
        self, ctx: SearchContext, population: list[Scored], n_crossover: int, n_mutation: int, generation: int
    ) -> list[list[float]]:
        rng = rng_for(ctx, generation, "random")
        exclude = {ctx.canonical(rates) for rates, _ in population}
        return _distinct(ctx, lambda: _random_rates(rng, ctx), n_crossover + n_mutation, exclude)


class GAOracle:
    """A classical genetic algorithm under the same constraints as the LLM.

    Selection is a tournament (the best of ``tournament`` random members); mutation adds gaussian
    noise of std ``mutation_sigma`` to every rate; crossover takes each rate from one of two
    parents at random (uniform crossover). Both break the mean constraint, so each child is
    projected back onto ``mean = beta`` and the bounds, the same repair an LLM's reply gets.
    Initialization is random (a GA has no prior about the model).
    """

    def __init__(self, tournament: int = 3, mutation_sigma: float = 0.05) -> None:
        self.tournament = tournament
        self.mutation_sigma = mutation_sigma

    def initialize(self, ctx: SearchContext, k: int) -> list[list[float]]:
        return self.random_init(ctx, k, set())

    def evolve(
        self, ctx: SearchContext, population: list[Scored], n_crossover: int, n_mutation: int, generation: int
    ) -> list[list[float]]:
        exclude = {ctx.canonical(rates) for rates, _ in population}
        return self.mutate(ctx, population, n_mutation, generation, exclude) + self.crossover(
            ctx, population, n_crossover, generation, exclude
        )

    def random_init(self, ctx: SearchContext, n: int, exclude: set[Hashable]) -> list[list[float]]:
        """``n`` random vectors whose keys are not in ``exclude`` (which is updated)."""
        rng = rng_for(ctx, 0, "ga-init")
        return _distinct(ctx, lambda: _random_rates(rng, ctx), n, exclude)

    def mutate(
        self, ctx: SearchContext, population: list[Scored], n: int, generation: int, exclude: set[Hashable]
    ) -> list[list[float]]:
        """``n`` mutants of tournament-selected parents, distinct from ``exclude`` (updated)."""
        if n <= 0:
            return []
        rng = rng_for(ctx, generation, "ga-mutation")

        def child() -> list[float]:
            parent = self._select(rng, population)
            return project_to_mean([r + rng.gauss(0.0, self.mutation_sigma) for r in parent], ctx.beta, ctx.p_max)

        return _distinct(ctx, child, n, exclude)

    def crossover(
        self, ctx: SearchContext, population: list[Scored], n: int, generation: int, exclude: set[Hashable]
    ) -> list[list[float]]:
        """``n`` uniform crossovers of two tournament-selected parents, distinct from ``exclude``."""
        if n <= 0:
            return []
        rng = rng_for(ctx, generation, "ga-crossover")

        def child() -> list[float]:
            a, b = self._select(rng, population), self._select(rng, population)
            mixed = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
            return project_to_mean(mixed, ctx.beta, ctx.p_max)

        return _distinct(ctx, child, n, exclude)

    def _select(self, rng: random.Random, population: list[Scored]) -> list[float]:
        return tournament(rng, population, self.tournament)


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

# How each reply of an LLM oracle ended, in best.json and the artifacts: valid as sent, usable after
# repair, unusable, cut at max_tokens, or not answered in time.
REPLY_KINDS = ("valid", "repaired", "invalid", "cut", "late")


def rates_schema(count: int, n_layers: int, p_max: float) -> dict:
    """The JSON Schema of a reply holding ``count`` rate vectors of ``n_layers`` entries in [0, p_max]."""
    vector = {"type": "array", "minItems": n_layers, "maxItems": n_layers,
              "items": {"type": "number", "minimum": 0, "maximum": p_max}}
    return {"type": "object", "properties": {"rates": {"type": "array", "minItems": count, "maxItems": count,
                                                       "items": vector}},
            "required": ["rates"], "additionalProperties": False}


def reply_budget(count: int, n_layers: int) -> int:
    """max_tokens for a reply of ``count`` vectors of ``n_layers`` rates: about 8 tokens per number
    (digits, separator, spaces) with room for the JSON around it. A reply cut at the limit is
    invalid and re-asked, never waited out."""
    return 256 + 8 * count * n_layers

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


class LLMOracle(ChatOracle):
    """Self-Pruner's oracle: the paper's prompts sent through an injected ``transport``.

    The transport is injected so the orchestrator can cache each call by its exact request, and
    tests can script replies. Replies are untrusted: they are parsed and repaired
    (:mod:`.replies`), duplicates (against each other and the current population) are dropped,
    and the question is asked again, up to ``max_reasks`` times, for what is still missing. Any
    shortfall after that is filled by ``fallback`` (a :class:`GAOracle`) and counted in
    ``fallbacks``, so a poor model degrades the search visibly instead of stopping it. Only a
    transport failure (:class:`OracleUnavailable`) stops it.

    Every request carries ``max_tokens`` (``max_tokens``, else :func:`reply_budget` of what it
    asks for) and, unless ``schema`` is off, the JSON Schema of the expected reply. A request the server did not answer in
    time is never sent again: the step falls back to ``fallback`` at once (a "late" reply; one that
    could not be read at all is "invalid" and falls back the same way). With ``strict`` (paper-faithful runs) any fallback raises
    :class:`OracleUnavailable` instead.

    Counters: ``calls`` (requests made), ``fallbacks`` (vectors the GA supplied), ``rejected``
    (vectors of wrong length or non-finite), ``duplicates`` (vectors dropped as repeats),
    ``replies`` (how each reply ended, :data:`REPLY_KINDS`), ``reasks``, the token counts and
    ``seconds`` spent waiting on the transport (a replayed reply takes none); :meth:`accounting`
    gathers them.
    """

    def __init__(self, model: str, transport: Transport, fallback: GAOracle | None = None, **settings) -> None:
        super().__init__(model, transport, fallback or GAOracle(), REPLY_KINDS, **settings)
        self.rejected = 0

    def accounting(self) -> dict:
        return super().accounting() | {"rejected_vectors": self.rejected}

    def initialize(self, ctx: SearchContext, k: int) -> list[list[float]]:
        prompt = partial(
            prompts.initialization_prompt, ctx.model_name, ctx.n_layers, beta=ctx.beta, p_max=ctx.p_max, dataset=ctx.dataset,
            baselines=ctx.baselines,
        )
        exclude: set[Hashable] = set()
        got = self._ask(ctx, "init", 0, prompt, k, exclude)
        return got + self._fill(self.fallback.random_init(ctx, k - len(got), exclude))

    def evolve(
        self, ctx: SearchContext, population: list[Scored], n_crossover: int, n_mutation: int, generation: int
    ) -> list[list[float]]:
        exclude = {ctx.canonical(rates) for rates, _ in population}
        names = {ctx.canonical(list(rates)): name for name, rates in ctx.baselines}
        labels = [names.get(ctx.canonical(rates)) for rates, _ in population]
        out: list[list[float]] = []
        for op, n, ga_op in (
            ("mutation", n_mutation, self.fallback.mutate),
            ("crossover", n_crossover, self.fallback.crossover),
        ):
            if n <= 0:
                continue
            prompt = partial(
                prompts.evolution_prompt, op, ctx.model_name, ctx.n_layers, population, beta=ctx.beta, p_max=ctx.p_max,
                labels=labels,
            )
            got = self._ask(ctx, op, generation, prompt, n, exclude)
            out += got + self._fill(ga_op(ctx, population, n - len(got), generation, exclude))
        return out

    def _ask(
        self,
        ctx: SearchContext,
        op: str,
        generation: int,
        prompt: Callable[[int], str],
        need: int,
        exclude: set[Hashable],
    ) -> list[list[float]]:
        """Ask (and re-ask) for ``need`` new vectors; returns the distinct valid ones obtained."""
        accepted: list[list[float]] = []
        for attempt in range(self.max_reasks + 1):
            missing = need - len(accepted)
            if missing <= 0:
                break
            reply = self._send(ChatRequest(
                backend=self.backend,
                model=self.model,
                messages=(("user", prompt(missing)),),
                temperature=self.temperature,
                seed=self._seed(ctx, op, generation, attempt),
                attempt=attempt,
                json_mode=self.json_mode,
                max_tokens=self.max_tokens or reply_budget(missing, ctx.n_layers),
                schema=stable_json(rates_schema(missing, ctx.n_layers, ctx.p_max)) if self.json_mode and self.schema else None,
            ))
            if self._unanswered(reply):
                break
            if reply.finish_reason == "length":  # cut: whatever it holds is not the answer asked for
                self.replies["cut"] += 1
                continue
            parsed = parse_candidates(reply.text, ctx.n_layers, limit=2 * missing)  # room for repeats, no more
            valid, rejected = repair(parsed, ctx.n_layers, ctx.beta, ctx.p_max)
            self.replies[_reply_kind(parsed, valid, rejected)] += 1
            self.rejected += rejected
            for rates in valid:
                if len(accepted) == need:
                    break
                key = ctx.canonical(rates)
                if key in exclude:
                    self.duplicates += 1
                    continue
                exclude.add(key)
                accepted.append(rates)
        return accepted


def _reply_kind(parsed: list[list[float]], valid: list[list[float]], rejected: int) -> str:
    """"valid" if every vector was feasible as sent, "repaired" if some were usable only after
    repair (or some were rejected), "invalid" if none was usable."""
    if not valid:
        return "invalid"
    if rejected or any(abs(a - b) > 1e-9 for p, v in zip(parsed, valid) for a, b in zip(p, v)):
        return "repaired"
    return "valid"


def _token_count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def read_completion(body: bytes) -> Reply:
    """The reply in a chat-completion body, read without trusting it: never raises.

    A body that is not one (HTML, invalid UTF-8, JSON nested past Python's recursion limit, no
    ``choices[0].message`` with a text ``content``) is ``Reply(None, error=why)``; a ``usage`` that
    is not counts is zero tokens."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        return Reply(None, error=f"the body is not JSON ({type(e).__name__})")
    choices = data.get("choices") if isinstance(data, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(message, dict) or not isinstance(content, (str, type(None))):
        return Reply(None, error="the body is not a chat completion (no choices[0].message with a text content)")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    finish = choice.get("finish_reason")
    return Reply(content or "", finish if isinstance(finish, str) else None,
                 _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens")))


def openai_transport(
    base_url: str | None, api_key_env: str | None = None, timeout: float = 60.0, max_retries: int = 4,
    max_bytes: int = MAX_REPLY_BYTES,
) -> Transport:
    """A transport through the official ``openai`` client, for OpenAI or any compatible server.

    ``base_url`` is the public URL (:func:`selfprune.evolve.endpoint.public_url`). The client is
    built on the first call, so a run whose every call is already cached needs neither key nor server.

    * **Keys** (:func:`selfprune.evolve.endpoint.api_key`): ``$OPENAI_API_KEY`` for the OpenAI API
      only; another server gets ``$api_key_env`` when one is named, else the placeholder "EMPTY".
      Credentials cut from the base URL go to its server (basic auth, the query on every request).
    * **Reply shape.** The request's :meth:`ChatRequest.response_formats` are tried in order; one a
      server rejects (HTTP 400/422, or a 500 that names the format) is not sent to that server and
      model again: the working form is found once and remembered.
    * **Bounded.** ``max_tokens`` is sent; a reply cut at it (``finish_reason == "length"``) is
      invalid to the oracle (re-asked, never waited out). Each request ends within ``timeout``
      seconds, whole: one not answered by then (a trickled one too) returns ``Reply(None)``. At most
      ``max_bytes`` are read.
    * **Untrusted replies.** A body past ``max_bytes``, compressed, or not a chat completion
      (:func:`read_completion`) is ``Reply(None, error=why)``: an invalid reply, with a warning.
    * **Timeouts are not re-sent.** A server still generating would only queue the copy (llama.cpp
      keeps generating for a client that gave up): the oracle falls back for that step.
    * **Transient failures** (connection errors, 408/409/429/5xx) are retried ``max_retries`` times
      with backoff (the server's ``retry-after`` when it gives a finite one). What remains, and
      401/403/404 at once, becomes :class:`OracleUnavailable`, whose message never holds a secret.
    """
    import openai  # here, not at the top: importing it is slow and only this oracle needs it

    where = base_url or OPENAI_URL
    cut = credentials(base_url)
    secrets = [s for s in (cut.password, *(value for _, value in cut.query)) if s] if cut else []
    state: dict = {"client": None, "format": {}}

    def client() -> openai.OpenAI:
        if state["client"] is None:
            missing = missing_key(base_url, api_key_env)
            if missing:
                raise OracleUnavailable(missing)
            key = api_key(base_url, api_key_env)
            secrets.append(key)
            auth = (cut.user or "", cut.password or "") if cut and (cut.user or cut.password) else None
            state["client"] = openai.OpenAI(
                api_key=key, base_url=where, timeout=timeout, max_retries=0,
                default_query=dict(cut.query) if cut and cut.query else None,
                http_client=bounded_client(where, timeout, auth))
        return state["client"]

    def scrub(text: str) -> str:
        """At most 300 characters of a server's message, on one line, with no secret of ours in it."""
        for secret in secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())[:300]

    def rejects_format(e: openai.APIStatusError) -> bool:
        return e.status_code in (400, 422) or (e.status_code == 500 and any(
            word in str(e.message).lower() for word in ("json", "schema", "response_format", "grammar")))

    def backoff(attempt: int, e: Exception) -> None:
        headers = getattr(getattr(e, "response", None), "headers", None) or {}
        try:
            wait = float(headers["retry-after-ms"]) / 1000 if "retry-after-ms" in headers else float(headers["retry-after"])
        except (KeyError, ValueError):
            wait = math.nan
        time.sleep(min(max(wait, 0.0), 30.0) if math.isfinite(wait) else 0.5 * 2**attempt)

    def unreadable(why: str) -> Reply:
        logger.warning("the oracle at %s sent a reply that could not be read (%s); it counts as invalid", where, why)
        return Reply(None, error=why)

    def call(kwargs: dict) -> Reply:
        """One request, with retries of transient failures."""
        for attempt in range(max_retries + 1):
            last = attempt == max_retries
            try:
                with request_bounds(timeout, max_bytes):
                    body = client().chat.completions.with_raw_response.create(**kwargs).http_response.content
                reply = read_completion(body)
                return reply if reply.error is None else unreadable(reply.error)
            except openai.APITimeoutError:
                return Reply(None)
            except openai.APIConnectionError as e:
                if isinstance(e.__cause__, ReplyRefused):
                    return unreadable(str(e.__cause__))
                if last:
                    raise OracleUnavailable(
                        f"oracle at {where} could not be reached ({max_retries + 1} tries): start the server or fix "
                        "the oracle base URL"
                    ) from None
                backoff(attempt, e)
            except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
                raise OracleUnavailable(
                    f"oracle at {where} refused the API key (HTTP {e.status_code}): set a valid key in "
                    f"${api_key_env or 'OPENAI_API_KEY'}" + ("" if api_key_env else " (or name its variable with --api-key-env)")
                ) from None
            except openai.NotFoundError:
                raise OracleUnavailable(
                    f"oracle at {where} does not serve model {kwargs['model']!r} (HTTP 404): "
                    "check the model name after 'openai:' and the base URL"
                ) from None
            except openai.APIStatusError as e:
                if "response_format" in kwargs and rejects_format(e):
                    raise
                if last or e.status_code not in (408, 409, 429) and e.status_code < 500:
                    raise OracleUnavailable(
                        f"oracle at {where} answered HTTP {e.status_code} ({scrub(str(e.message))}); transient errors "
                        f"were retried {max_retries} times: check the server's log and the request limits, or retry later"
                    ) from None
                backoff(attempt, e)
            except openai.APIError as e:
                raise OracleUnavailable(
                    f"oracle at {where} sent an unusable response ({scrub(str(e))}): check that it speaks "
                    "the OpenAI chat-completions API"
                ) from None
        raise AssertionError("unreachable")

    def send(request: ChatRequest) -> Reply:
        kwargs: dict = dict(model=request.model, messages=request.api_messages(), temperature=request.temperature,
                            seed=request.seed)
        if request.max_tokens:
            kwargs["max_tokens"] = request.max_tokens
        formats = request.response_formats()
        remembered = (request.model, len(formats))
        for i in range(state["format"].get(remembered, 0), len(formats)):
            fmt = formats[i]
            try:
                reply = call(kwargs | ({"response_format": fmt} if fmt else {}))
            except openai.APIStatusError:  # this server rejects that form: try the next, and remember
                continue
            state["format"][remembered] = i
            return reply
        raise AssertionError("unreachable: the last form (none) is never rejected")

    return send


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
