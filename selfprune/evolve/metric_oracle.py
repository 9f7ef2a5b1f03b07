"""The LLM oracle of the metric search: GCoT prompts (:mod:`.metric_prompts`) through an injected
transport, with the GP oracle (:class:`selfprune.evolve.gp.GPOracle`) as its fallback.

It keeps the GP oracle's contract, so the search loop never has to check which one it has: every
returned text is canonical and valid (``parse_metric`` accepts it, and it reads G only when
``ctx.gradient``), no two returned texts share a ``ctx.canonical`` key, none is in the population
or already in the lineage, and every one is recorded in the shared :class:`Lineage` (source "llm"
for the model's, "gp"/"random"/"built-in" for the fallback's).

It mirrors the rate search's :class:`selfprune.evolve.llm_oracle.LLMOracle` (same :class:`ChatRequest`,
:class:`Reply`, transport, seeds, ``max_reasks``, ``strict`` and accounting), with one difference:
a re-ask continues the conversation. The model's previous reply goes back as the assistant turn,
followed by a user turn listing each refused metric with the reason ``parse_metric`` gave (or
"duplicate", "cut", "no JSON"), so the model can fix what it wrote. What goes back is bounded, so a
rambling or hostile reply cannot grow the requests (nor the cache that keys on them): the reply's
first :data:`MAX_ECHOED` characters, and at most :data:`MAX_PROBLEMS` refusals, each shortened.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from ..core.registry import Registry
from ..llm.chat import ChatRequest, Transport
from ..metrics.builtin import METRICS
from ..metrics.edits import describe_edit
from ..metrics.language import MetricError
from ..metrics.metric import Metric, parse_metric
from ..metrics.search_space import Lineage, MetricContext, ScoredMetric, canonical_text
from ..storage.hashing import stable_json
from . import metric_prompts as prompts
from .chat_oracle import ChatOracle
from .gp import GPOracle
from .oracle_registry import OracleKind, build_oracle, openai_builder
from .replies import _json_documents  # the tolerant JSON extraction (fences, prose around it)
from .search_context import Oracle

# How each reply ended: every proposal taken, some taken, none taken, cut at max_tokens, not in time.
METRIC_REPLY_KINDS = ("valid", "partial", "invalid", "cut", "late")
_WHOLE_REPLY = "(your reply)"  # how a follow-up names a problem of the reply rather than of one metric
MAX_ECHOED = 12_000  # characters of a reply sent back as the assistant turn (a valid one is a few thousand)
MAX_PROBLEMS = 8  # refused proposals examined and listed per reply; the rest of the reply is not read


class MetricOracle(Oracle[MetricContext, str], Protocol):
    """The oracle protocol over metric texts (canonical), recording each proposal in ``lineage``;
    see the module docstring."""

    lineage: Lineage


@dataclass(frozen=True)
class Proposal:
    """One entry of a reply, as sent: nothing in it is trusted (``metric`` may not even be a string)."""

    metric: Any
    parent: Any = None
    other_parent: Any = None


def parse_proposals(text: str, limit: int | None = None) -> list[Proposal] | None:
    """The proposals of a reply (the first ``limit``), in order; None when it holds no JSON with a
    list of metrics.

    Accepted shapes (possibly in a Markdown fence or among prose): ``{"metrics": [entry, ...]}``, a
    bare ``[entry, ...]``, or one entry object, where an entry is ``{"metric": ..., "parent": ...,
    "other_parent": ...}`` or just the expression string. Nothing is evaluated here.
    """
    if not isinstance(text, str):
        return None
    for doc in _json_documents(text):
        if isinstance(doc, dict) and "metric" in doc and "metrics" not in doc:
            doc = [doc]
        entries = doc.get("metrics") if isinstance(doc, dict) else doc
        if isinstance(entries, list):
            return [Proposal(e.get("metric"), e.get("parent"), e.get("other_parent")) if isinstance(e, dict)
                    else Proposal(e) for e in entries[:limit]]
    return None


def metric_reply_budget(count: int) -> int:
    """max_tokens for a reply of ``count`` metrics: room for the short reasoning, then about 160
    tokens per entry (ids, edit, expression, JSON). A reply cut at the limit is re-asked."""
    return 512 + 160 * count


class LLMMetricOracle(ChatOracle):
    """The metric search's LLM oracle; see the module docstring.

    ``lineage`` is shared with the GP ``fallback`` (one is built on it when none is given; a given
    fallback must hold the same object). Counters: ``calls``, ``reasks``, ``fallbacks`` (metrics the
    GP supplied), ``refused`` (proposals ``parse_metric`` or the gradient rule refused, or that were
    not a string), ``duplicates`` (proposals canonically equal to one already proposed or
    evaluated), ``replies`` (:data:`METRIC_REPLY_KINDS`), token counts and ``seconds``;
    :meth:`accounting` gathers them. With ``strict`` any fallback raises :class:`OracleUnavailable`.
    """

    fallback_name = "GP"

    def __init__(self, model: str, transport: Transport, lineage: Lineage | None = None,
                 fallback: GPOracle | None = None, graph_nodes: int = prompts.GRAPH_NODES, **settings) -> None:
        if lineage is None:
            lineage = fallback.lineage if fallback is not None else Lineage()
        if fallback is not None and fallback.lineage is not lineage:
            raise ValueError("the LLM metric oracle and its GP fallback must share one Lineage")
        super().__init__(model, transport, fallback or GPOracle(lineage=lineage), METRIC_REPLY_KINDS, **settings)
        self.lineage = lineage
        self.graph_nodes = graph_nodes
        self.refused = 0

    def accounting(self) -> dict:
        return super().accounting() | {"refused": self.refused}

    def initialize(self, ctx: MetricContext, k: int) -> list[str]:
        """The usable built-ins (through the GP oracle, which records them as "built-in"), then ``k``
        minus their number from the model, shown the built-ins as the graph; the GP fills the rest."""
        usable = sum(ctx.gradient or not METRICS.get(name).needs_gradient for name in METRICS.names())
        seeds = self.fallback.initialize(ctx, min(k, usable))
        exclude = self._known(ctx, seeds)
        graph, ids = prompts.seeds_graph(self.lineage, seeds)
        need = k - len(seeds)
        got = self._ask(ctx, "init", 0, partial(prompts.initialization_prompt, ctx, graph), ids, need, exclude)
        return seeds + got + self._fill(self.fallback.random_init(ctx, need - len(got), exclude))

    def evolve(self, ctx: MetricContext, population: list[ScoredMetric], n_crossover: int, n_mutation: int,
               generation: int) -> list[str]:
        """Offspring of ``population`` (text, perplexity; lower is better): mutants then crossovers.
        Both prompts show the same graph (drawn before either step adds to the lineage)."""
        graph, ids = prompts.render_graph(self.lineage, dict(population), self.graph_nodes)
        exclude = self._known(ctx, [text for text, _ in population])
        out: list[str] = []
        for op, n, prompt, gp_op in (
            ("mutation", n_mutation, prompts.mutation_prompt, self.fallback.mutate),
            ("crossover", n_crossover, prompts.crossover_prompt, self.fallback.crossover),
        ):
            if n <= 0:
                continue
            got = self._ask(ctx, op, generation, partial(prompt, ctx, graph), ids, n, exclude)
            out += got + self._fill(gp_op(ctx, population, n - len(got), generation, exclude))
        return out

    def _known(self, ctx: MetricContext, texts: list[str]) -> set[Hashable]:
        """The keys a new metric must avoid: ``texts`` and everything in the lineage."""
        return {ctx.canonical(text) for text in texts} | set(self.lineage.nodes)

    def _ask(self, ctx: MetricContext, op: str, generation: int, prompt: Callable[[int], str],
             ids: dict[str, str], need: int, exclude: set[Hashable]) -> list[str]:
        """Ask for ``need`` new metrics, then re-ask (in the conversation, with the reasons) for what
        is still missing; returns the accepted canonical texts (recorded in the lineage)."""
        accepted: list[str] = []
        messages: tuple[tuple[str, str], ...] = ()
        problems: list[tuple[str, str]] = []
        for attempt in range(self.max_reasks + 1):
            missing = need - len(accepted)
            if missing <= 0:
                break
            turn = prompt(missing) if attempt == 0 else prompts.refusal_prompt(problems, missing)
            messages += (("user", turn),)
            reply = self._send(self._request(ctx, op, generation, attempt, messages, missing))
            if self._unanswered(reply):
                break
            messages += (("assistant", reply.text[:MAX_ECHOED]),)
            if reply.finish_reason == "length":  # cut: whatever it holds is not the answer asked for
                self.replies["cut"] += 1
                problems = [(_WHOLE_REPLY, "it was cut at the length limit before it ended: keep the reasoning short")]
                continue
            problems = self._take(ctx, reply.text, ids, generation, missing, exclude, accepted)
        return accepted

    def _request(self, ctx: MetricContext, op: str, generation: int, attempt: int,
                 messages: tuple[tuple[str, str], ...], missing: int) -> ChatRequest:
        return ChatRequest(
            backend=self.backend,
            model=self.model,
            messages=messages,
            temperature=self.temperature,
            seed=self._seed(ctx, op, generation, attempt),
            attempt=attempt,
            json_mode=self.json_mode,
            max_tokens=self.max_tokens or metric_reply_budget(missing),
            schema=stable_json(prompts.metrics_schema(missing)) if self.json_mode and self.schema else None,
        )

    def _take(self, ctx: MetricContext, text: str, ids: dict[str, str], generation: int, missing: int,
              exclude: set[Hashable], accepted: list[str]) -> list[tuple[str, str]]:
        """Accept the new valid metrics of a reply (at most ``missing``) into ``accepted``, ``exclude``
        and the lineage; returns ``(metric, reason)`` for each proposal that was not taken."""
        proposals = parse_proposals(text, limit=missing + MAX_PROBLEMS)
        if not proposals:
            self.replies["invalid"] += 1
            found = "an empty list of metrics" if proposals == [] else 'no JSON object with a "metrics" list'
            return [(_WHOLE_REPLY, f"it held {found}; reply with only the JSON object")]
        problems: list[tuple[str, str]] = []
        taken = 0
        for proposal in proposals:
            if taken == missing or len(problems) == MAX_PROBLEMS:
                break
            shown = proposal.metric if isinstance(proposal.metric, str) else reprlib.repr(proposal.metric)  # bounded
            checked = self._check(ctx, proposal.metric)
            if isinstance(checked, str):
                self.refused += 1
                problems.append((shown, checked))
                continue
            child = checked.text
            if ctx.canonical(child) in exclude:
                self.duplicates += 1
                where = next((i for i, t in ids.items() if t == child), None)
                problems.append((shown, f"a duplicate: the same metric as {where or 'one proposed before'} "
                                        f"(`{child}`); propose a different one"))
                continue
            exclude.add(ctx.canonical(child))
            accepted.append(child)
            taken += 1
            parents = tuple(dict.fromkeys(p for p in (_resolve(proposal.parent, ids), _resolve(proposal.other_parent, ids))
                                          if p is not None and p != child))
            edit = describe_edit(parents[0], child) if parents else "new"
            self.lineage.add(child, parents, edit, generation, "llm")
        self.replies["valid" if not problems else "partial" if taken else "invalid"] += 1
        if taken < missing and not problems:
            problems.append((_WHOLE_REPLY, f"it held {taken} metric(s) where {missing} were asked"))
        return problems

    @staticmethod
    def _check(ctx: MetricContext, metric: Any) -> Metric | str:
        """The parsed metric, or why it is refused (a string). Never evaluates the text itself."""
        if not isinstance(metric, str):
            return 'the "metric" field must be a string holding one expression'
        try:
            parsed = parse_metric(metric)
        except MetricError as e:
            return str(e)
        if parsed.needs_gradient and not ctx.gradient:
            return "it reads G, which this search does not have (no gradient statistic); use W, X_rms, X_mean, X_var"
        return parsed


def _resolve(ref: Any, ids: dict[str, str]) -> str | None:
    """A parent named in a reply: an id of the graph ("m3"), or the text of a metric in the graph."""
    if not isinstance(ref, str):
        return None
    ref = ref.strip()
    if ref in ids:
        return ids[ref]
    try:
        text = canonical_text(ref)
    except MetricError:
        return None
    return text if text in ids.values() else None


def _gp(arg: str, base_url: str | None, transport: Transport | None, lineage: Lineage, **_) -> GPOracle:
    return GPOracle(lineage=lineage)


METRIC_ORACLES: Registry[OracleKind] = Registry("metric oracle")
METRIC_ORACLES.register("gp", OracleKind("gp", _gp))
METRIC_ORACLES.register("openai", OracleKind("openai:MODEL", openai_builder(LLMMetricOracle)))


def make_metric_oracle(spec: str, base_url: str | None = None, transport: Transport | None = None,
                       lineage: Lineage | None = None, **options) -> MetricOracle:
    """The metric search's oracle from its spec (:func:`build_oracle` on :data:`METRIC_ORACLES`), on
    ``lineage`` (a new one if None), which the LLM oracle's GP fallback shares; the GP oracle
    ignores the LLM's options."""
    return build_oracle(METRIC_ORACLES, spec, base_url, transport,
                        lineage=lineage if lineage is not None else Lineage(), **options)
