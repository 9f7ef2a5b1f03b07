"""Self-Pruner's oracle: an LLM doing initialization, selection, crossover and mutation from the
paper's prompts (:class:`LLMOracle`), with a :class:`~.classical.GAOracle` to fill in what its
replies leave short. It keeps the contract of :mod:`.search_context`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from functools import partial

from ..llm.chat import ChatRequest, Transport
from ..storage.hashing import stable_json
from . import prompts
from .chat_oracle import ChatOracle
from .classical import GAOracle
from .replies import parse_candidates, repair
from .search_context import Scored, SearchContext

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
