"""Typed run configurations: one definition for the library, the CLI, the flows and prefect.yaml.

``SearchConfig`` and ``ReportConfig`` are frozen pydantic models. Each flow takes one as its only
parameter (Prefect builds the UI form and validates deployment parameters from it), the CLI
generates the command's options from its fields, and the library functions (``selfprune.search``,
``selfprune.report``) take it directly. Checks that need nothing loaded run on construction, so a
bad value fails before any model is read; checks that need the tokenizer (does each split hold
the windows asked of it?) run before the calibration pass (:func:`selfprune.evolve.pipeline.check_windows`).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .core.errors import UserError
from .core.urls import public_url


def _comma_separated(value):
    """``0.3,0.5`` and ``["0.3", "0.5"]`` alike: list options take both forms on the command line."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        return value
    parts = [p for item in items for p in (item.split(",") if isinstance(item, str) else [item])]
    return [p.strip() if isinstance(p, str) else p for p in parts if not isinstance(p, str) or p.strip()]


RUNNERS = ("local", "dask", "ray")


def registered_allocations() -> list[str]:
    """The allocations registered with a place among the baselines, in it: what a rate search starts
    from. Imported when a config is made, not when this module is (the CLI's help stays free of torch)."""
    from .allocators import ALLOCATIONS

    return ALLOCATIONS.ranked()


def _none_or_list(value):
    """``none`` is the empty list; anything else as :func:`_comma_separated`."""
    items = _comma_separated(value)
    return [] if items == ["none"] else items


class RunConfig(BaseModel):
    """What every run names: the model, the data, the pruning method, the precision."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field("demo", description="demo, a local HF directory, a .gguf file, or a hub id")
    data: str = Field("demo", description="demo, wikitext2, or a local .txt/.md/.jsonl/.json/.parquet file")
    method: str = Field("wanda-sp", description="pruning method (its unit rankings)")
    seqlen: int = Field(512, ge=1, description="tokens per perplexity window")
    batch_size: int = Field(4, ge=1, description="windows per forward pass (calibration and perplexity)")
    device: str = Field("auto", description="auto | cpu | cuda | map (layers spread over every visible GPU)")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16")


class EvolutionConfig(RunConfig):
    """What both searches share: the oracle, the evolutionary loop's sizes, the data they score on."""

    oracle: str = Field("ga", description="openai:MODEL | ga | random")
    base_url: str | None = Field(None, description="OpenAI-compatible server for openai:MODEL (vLLM, Ollama); "
                                                   "credentials in it are never recorded")
    api_key_env: str | None = Field(None, description="variable holding the --base-url server's key "
                                                      "($OPENAI_API_KEY goes to api.openai.com only)")
    population: int = Field(30, ge=2, description="K: population size")
    mutations: int = Field(10, ge=0, description="M: mutants per generation")
    crossovers: int = Field(10, ge=0, description="S: crossovers per generation")
    generations: int = Field(20, ge=0, description="N: generations")
    seed: int = Field(0, description="seeds the oracles: same seed, same search")
    samples: int = Field(128, ge=1, description="calibration windows for the activation statistics")
    calib_seqlen: int = Field(512, ge=1, description="tokens per calibration window")
    fitness_windows: int = Field(8, ge=1, description="windows of the fitness split per candidate")
    test_windows: int = Field(64, ge=0, description="windows of the test split for the final score (0: all)")
    oracle_timeout: float = Field(120.0, gt=0, description="seconds an oracle request may take; a late one is not re-sent")
    oracle_max_tokens: int = Field(0, ge=0, description="reply token limit per oracle request (0: from the expected answer)")
    oracle_schema: bool = Field(True, description="send the reply's JSON Schema (else JSON mode only)")
    oracle_strict: bool = Field(False, description="fail instead of filling a step the LLM left short with GA/GP offspring")
    fitness_stages: list[str] = Field(
        default_factory=list,
        description="staged fitness WINDOWS:KEEP,... (e.g. 1:0.5): keep the best KEEP after WINDOWS windows")
    runner: str = Field("local", description="local | dask | ray: where a generation's candidates are scored")
    address: str | None = Field(None, description="a running cluster for --runner: tcp://HOST:8786 (dask), "
                                                  "ray://HOST:10001 or auto (ray)")
    workers: int = Field(2, ge=1, description="worker processes of the local Dask or Ray cluster (each loads the model once)")
    seeds: list[int] = Field(default_factory=list, description="one run per seed in OUT/seed-N, their spread "
                                                               "in OUT/seeds.json")
    oracle_prices: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=list, min_length=0, max_length=2,
        description="USD per million prompt, completion tokens (e.g. 2.5,10): the cost in best.json")

    _lists = field_validator("oracle_prices", "fitness_stages", "seeds", mode="before")(_comma_separated)

    @field_validator("base_url", mode="before")
    @classmethod
    def _public_base_url(cls, value):
        """Credentials are cut from the URL before the config is stored anywhere (a flow parameter,
        best.json, cache keys); :mod:`selfprune.core.urls` keeps them in memory for the server.
        A bad URL is a UserError, not a ValueError: pydantic would quote the input, secrets and all."""
        return public_url(value) if isinstance(value, str) else value

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _variable_name(cls, value):
        """A variable's name; a UserError that does not quote the value, which may be the key itself."""
        if isinstance(value, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise UserError("--api-key-env takes the name of an environment variable (letters, digits and _, "
                            "e.g. VLLM_API_KEY), not the key itself")
        return value

    @model_validator(mode="after")
    def _seed_or_seeds(self) -> EvolutionConfig:
        if self.seeds and self.seed != 0:
            raise ValueError("give --seed or --seeds, not both (--seeds 0,1,2 runs each of them)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {','.join(map(str, self.seeds))} repeats a seed; give each once")
        return self

    @model_validator(mode="after")
    def _two_prices(self) -> EvolutionConfig:
        if len(self.oracle_prices) == 1:
            raise ValueError("--oracle-prices takes two numbers: USD per million prompt tokens, then completion tokens")
        return self

    @property
    def stages(self) -> list[tuple[int, float]]:
        """``fitness_stages`` as (windows, kept fraction), checked on construction."""
        return [(int(w), float(k)) for w, k in (stage.split(":") for stage in self.fitness_stages)]

    @model_validator(mode="after")
    def _stages_before_the_full_fitness(self) -> EvolutionConfig:
        fix = "write WINDOWS:KEEP with WINDOWS rising and below --fitness-windows and KEEP in (0, 1), e.g. 1:0.5"
        try:
            stages = self.stages
        except ValueError:
            raise ValueError(f"--fitness-stages {','.join(self.fitness_stages)} is not a schedule: {fix}") from None
        windows = [w for w, _ in stages] + [self.fitness_windows]
        if any(a >= b for a, b in zip(windows, windows[1:])) or windows[0] < 1 or not all(0 < k < 1 for _, k in stages):
            raise ValueError(f"--fitness-stages {','.join(self.fitness_stages)}: {fix}")
        return self

    @model_validator(mode="after")
    def _known_runner(self) -> EvolutionConfig:
        if self.runner not in RUNNERS:
            raise ValueError(f"--runner {self.runner!r} is not known; use one of {', '.join(RUNNERS)}")
        if self.address and self.runner == "local":
            raise ValueError("--address names a Dask or Ray cluster: add --runner dask or --runner ray")
        return self


class SearchConfig(EvolutionConfig):
    """Self-Pruner's search settings (defaults: the paper's K=30, M=S=10, N=20)."""

    ratio: float = Field(0.5, gt=0, lt=1, description="target mean pruning rate beta, in (0, 1)")
    p_max: float = Field(0.9, gt=0, le=1, description="upper bound of any layer's rate")
    random_init: bool = Field(False, description="ablation: random initial population")
    no_mutation: bool = Field(False, description="ablation: no mutation")
    no_crossover: bool = Field(False, description="ablation: no crossover")
    align: int = Field(1, ge=1, description="kept MLP channels in multiples of this (64, 128 suit kernels)")
    align_heads: int = Field(1, ge=1, description="kept query heads in multiples of this (of heads per KV group)")
    metric: str | None = Field(None, description="rank units by a pruning metric instead of --method: a name such as "
                                                "ria, or an expression")
    pattern: str | None = Field(None, description="with --metric: search the per-layer sparsities of its "
                                                  "single-weight pruning in this pattern")
    baselines: list[str] = Field(default_factory=registered_allocations,
                                 description="allocations in generation 0: uniform,owl,sdsa,atp,dlp,alphapruning "
                                             "(default), some, or none")
    out: str = Field("runs/search", description="run directory (best.json, plots, evaluations.jsonl)")

    reconstruct: str = Field("none", description="lsq | sparsegpt | sparsegpt-adaptive: rebuild the best, test it")
    reconstruct_top: int = Field(1, ge=1, description="with --reconstruct: rebuild the N best and the baselines, keep the "
                                                      "best rebuilt")

    _baseline_list = field_validator("baselines", mode="before")(_none_or_list)

    @model_validator(mode="before")
    @classmethod
    def _metric_is_a_method(cls, values):
        """``metric=ria`` is the method ``metric:ria``: one name for the ranking everywhere downstream
        (with a ``pattern`` the metric prunes single weights instead, and stays a metric)."""
        if isinstance(values, dict) and values.get("pattern"):
            if not values.get("metric"):
                raise ValueError("--pattern searches the per-layer sparsities of a metric: give --metric too "
                                 "(wanda, ria, an expression, or an AutoPrune best.json)")
            return values
        if isinstance(values, dict) and values.get("metric"):
            method = values.get("method", "wanda-sp")
            if method not in ("wanda-sp", f"metric:{values['metric']}"):
                raise ValueError(f"give --metric or --method, not both (got --method {method})")
            values = {**values, "method": f"metric:{values['metric']}"}
        return values

    @model_validator(mode="after")
    def _ratio_within_p_max(self) -> SearchConfig:
        if self.ratio > self.p_max:
            raise ValueError(f"ratio {self.ratio} exceeds p_max {self.p_max}: lower --ratio or raise --p-max")
        return self


Ratio = Annotated[float, Field(gt=0, lt=1)]


class AutopruneConfig(EvolutionConfig):
    """AutoPrune's metric search: an oracle (``gp`` offline, or an LLM with GCoT prompts) proposes
    pruning metrics, each judged by the fitness perplexity of the model it prunes."""

    method: str = Field("wanda-sp", json_schema_extra={"cli": False},
                        description="not used: a metric ranks single weights, not units")
    oracle: str = Field("gp", description="gp | openai:MODEL")
    population: int = Field(12, ge=2, description="K: metrics kept per generation")
    mutations: int = Field(4, ge=0, description="M: mutated metrics per generation")
    crossovers: int = Field(4, ge=0, description="S: crossed metrics per generation")
    generations: int = Field(6, ge=0, description="N: generations")
    sparsities: list[Ratio] = Field(default_factory=lambda: [0.6], min_length=1, json_schema_extra={"cli": "--sparsity"},
                                    description="sparsity a metric is judged at; several: the mean fitness over them")
    pattern: str = Field("unstructured", description="unstructured | unstructured-layer | 2:4 | 4:8")
    allocation: str = Field("uniform", description="uniform | owl | sdsa | atp | dlp | alphapruning: per-layer sparsities")
    gradient: bool = Field(True, description="let metrics read G, the gradient statistic (one backward pass per window)")
    reconstruct: str = Field("none", description="none | sparsegpt: judge each metric after SparseGPT's weight update")
    out: str = Field("runs/autoprune", description="run directory (best.json, the metric graph, evaluations.jsonl)")

    _sparsity_list = field_validator("sparsities", mode="before")(_comma_separated)


class ReportConfig(RunConfig):
    """What a comparison report evaluates: dense, the allocations per ratio, searched allocations
    (one row per search, or per group of seeds), and single-weight pruning by metric per sparsity."""

    ratios: list[Ratio] = Field(default_factory=list, description="target ratios for uniform and OWL, e.g. 0.3,0.5")
    searches: list[str] = Field(default_factory=list, description="a search's best.json",
                                json_schema_extra={"cli": "--search"})
    allocations: list[str] = Field(default_factory=lambda: ["uniform", "owl"], json_schema_extra={"cli": "--allocation"},
                                   description="allocations of the structured rows at each --ratios: uniform, owl, sdsa, "
                                               "atp, dlp, alphapruning")
    metrics: list[str] = Field(default_factory=list, json_schema_extra={"cli": "--metric"},
                               description="metrics of the single-weight rows: magnitude, wanda, ria, pruner-zero, an expression")
    patterns: list[str] = Field(default_factory=lambda: ["unstructured"], json_schema_extra={"cli": "--pattern"},
                                description="sparsity patterns of the metric rows: unstructured, unstructured-layer, 2:4, 4:8")
    sparsities: list[Ratio] = Field(default_factory=list, json_schema_extra={"cli": "--sparsity"},
                                    description="sparsities of the metric rows (default: --ratios)")
    metric_allocations: list[str] = Field(default_factory=lambda: ["uniform", "owl", "sdsa"],
                                          json_schema_extra={"cli": "--metric-allocation"},
                                          description="allocations of the metric rows (N:M rows are uniform)")
    reconstructs: list[str] = Field(default_factory=lambda: ["none"], json_schema_extra={"cli": "--reconstruct"},
                                    description="reconstructions of the metric rows: none, sparsegpt, sparsegpt-adaptive")
    tasks: list[str] = Field(default_factory=lambda: ["selfprune_cloze"], min_length=1,
                             description="lm-eval tasks, e.g. boolq,piqa; selfprune_cloze/selfprune_lastword are built from --data")
    include_path: str | None = Field(None, description="a directory of lm-eval task YAMLs")
    limit: int = Field(0, ge=0, description="at most this many documents per task (0: all)")
    cloze_items: int = Field(200, ge=1, description="items of the offline cloze/lastword tasks")
    test_windows: int = Field(64, ge=0, description="windows of the test split (0: all)")
    samples: int | None = Field(None, ge=1, description="calibration windows (default: the searches', else 128)")
    calib_seqlen: int | None = Field(None, ge=1, description="tokens per calibration window (default: the searches', else 512)")
    max_length: int = Field(2048, ge=1, description="lm-eval context length")
    eval_batch_size: int = Field(8, ge=1, description="lm-eval batch")
    out: str = Field("runs/report", description="report directory (report.md, report.html, plots)")
    llamacpp: str | None = Field(None, description="add each row's decode speed in llama.cpp as GGUF at this "
                                                   "quantization: f16, q8_0, q4_k_m (needs llama-cpp-python)")

    _lists = field_validator("ratios", "sparsities", "tasks", "allocations", "metrics", "patterns", "metric_allocations",
                             "reconstructs", mode="before")(_comma_separated)

def build_config(cls: type[RunConfig], **values) -> RunConfig:
    """Build a config, turning pydantic's errors into one :class:`UserError` that names each bad
    field as the CLI spells it."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise UserError(config_error_message(e, cls)) from None


def cli_flag(cls: type[RunConfig], name: str) -> str:
    """The command-line option of a config field: ``--calib-seqlen``, or the field's own ``cli`` name."""
    extra = cls.model_fields[name].json_schema_extra if name in cls.model_fields else None
    return (extra or {}).get("cli") or "--" + name.replace("_", "-")


def config_error_message(e: ValidationError, cls: type[RunConfig]) -> str:
    lines = []
    for err in e.errors():
        loc = err["loc"]
        field = cli_flag(cls, str(loc[0])) if loc else "the configuration"
        got = f" (got {err['input']!r})" if loc else ""
        lines.append(f"{field}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(lines)
