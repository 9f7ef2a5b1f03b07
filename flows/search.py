"""Self-Pruner's evolutionary search (Algorithm 1) as a Prefect flow, one subflow per generation.

Every candidate evaluation and oracle call is a content-hash-cached task (``tasks/``), so
running the same command again after a crash, a SIGKILL or a failed generation redoes only
what had not completed and follows the same path: the oracles are deterministic given the seed,
and LLM replies are replayed from the cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact

from selfprune.allocation import check_ratio, kept_params, rates_to_structure, structure_from_json, structure_to_json, uniform
from selfprune.arch import Arch
from selfprune.fileio import atomic_write_text
from selfprune.artifacts.report import best_markdown, fmt_rates, plot_history, plot_rates
from selfprune.models import model_fingerprint
from selfprune.search.evolution import SearchParams, initial_population, offspring, survivors
from selfprune.search.oracles import SearchContext, make_oracle
from selfprune.tasks.oracle import oracle_call
from selfprune.tasks.pruning import capture_statistics, score_candidate


def _search_objects(config: dict, setup: dict):
    """Rebuild the pure search objects from plain settings (subflow parameters stay JSON)."""
    arch = Arch(**setup["arch"])

    def canonical(rates: list[float]) -> tuple:
        return tuple(map(tuple, structure_to_json(rates_to_structure(arch, rates))))

    ctx = SearchContext(
        model_name=config["model"], n_layers=arch.n_layers, beta=config["ratio"], p_max=config["p_max"],
        seed=config["seed"], canonical=canonical, dataset=config["data"],
    )
    params = SearchParams(
        population=config["population"], mutations=config["mutations"], crossovers=config["crossovers"],
        generations=config["generations"], seed=config["seed"], random_init=config["random_init"],
        no_mutation=config["no_mutation"], no_crossover=config["no_crossover"],
    )

    calls = {"made": 0, "replayed": 0}

    def transport(request) -> str:
        state = oracle_call(request.to_dict(), config["base_url"], config["oracle_timeout"], return_state=True)
        calls["replayed" if state.name == "Cached" else "made"] += 1
        return state.result()

    return arch, ctx, params, make_oracle(config["oracle"], config["base_url"], transport), calls


def _scoring(config: dict, split: str, windows: int | None) -> dict:
    return {"data": config["data"], "split": split, "seqlen": config["seqlen"], "windows": windows or None,
            "batch_size": config["batch_size"]}


def _calibration(config: dict) -> dict:
    return {"data": config["data"], "samples": config["samples"], "seqlen": config["calib_seqlen"],
            "batch_size": config["batch_size"]}


def _evaluate(config: dict, setup: dict, structure: list, split: str, windows: int | None) -> tuple[dict, bool]:
    """Score one structure through the cached task; also say whether the cache answered."""
    state = score_candidate(
        config["model"], setup["model_fp"], setup["stats_key"], structure, _scoring(config, split, windows),
        _calibration(config), config["device"], config["dtype"], str(Path(config["out"]) / "evaluations.jsonl"),
        return_state=True,
    )
    return state.result(), state.name == "Cached"


@flow(name="selfprune-generation", flow_run_name="generation-{generation}", validate_parameters=False)
def generation(generation: int, population: list[dict], setup: dict, config: dict) -> dict:
    """Generation 0 builds and scores G_0; generation g >= 1 asks the oracle for mutants and
    crossovers of the population, scores them, and keeps the top K of both (Algorithm 1)."""
    arch, ctx, params, oracle, calls = _search_objects(config, setup)
    if generation == 0:
        children = initial_population(oracle, ctx, params)
    else:
        children = offspring(oracle, ctx, params, [(p["rates"], p["fitness"]) for p in population], generation)
    scored, rows, evaluations, hits = [], [], 0, 0
    for rates in children:
        structure = structure_to_json(rates_to_structure(arch, rates))
        result, cached = _evaluate(config, setup, structure, "fitness", config["fitness_windows"])
        evaluations += not cached
        hits += cached
        member = {"rates": rates, "structure": structure, "fitness": result["ppl"],
                  "kept_params": kept_params(arch, structure_from_json(structure))}
        scored.append(member)
        rows.append({"rates": fmt_rates(rates), "kept_params": member["kept_params"],
                     "fitness": round(result["ppl"], 4), "origin": "cache" if cached else config["oracle"]})
    merged = survivors([(m["rates"], m["fitness"]) for m in population + scored], params.population)
    by_rates = {tuple(m["rates"]): m for m in population + scored}
    new_population = [by_rates[tuple(r)] for r, _ in merged]
    create_table_artifact(rows, key=f"{config['artifact_key']}-gen-{generation}",
                          description=f"generation {generation}: {len(rows)} candidates")
    create_markdown_artifact(best_markdown(generation, new_population[0], arch.n_layers),
                             key=f"{config['artifact_key']}-best")
    return {
        "population": new_population,
        "evaluations": evaluations,
        "cache_hits": hits,
        "oracle_calls": calls["made"],
        "oracle_replays": calls["replayed"],
        "oracle_fallbacks": getattr(oracle, "fallbacks", 0),
    }


@flow(name="selfprune-search", validate_parameters=True)
def search(
    model: str = "demo",
    ratio: float = 0.5,
    oracle: str = "ga",
    base_url: str | None = None,
    data: str = "demo",
    population: int = 30,
    mutations: int = 10,
    crossovers: int = 10,
    generations: int = 20,
    seed: int = 0,
    p_max: float = 0.9,
    samples: int = 128,
    calib_seqlen: int = 512,
    seqlen: int = 512,
    fitness_windows: int = 8,
    test_windows: int = 64,
    batch_size: int = 4,
    random_init: bool = False,
    no_mutation: bool = False,
    no_crossover: bool = False,
    oracle_timeout: float = 120.0,
    out: str = "runs/search",
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Search per-layer rates with mean ``ratio`` for ``model``; write ``out/best.json`` and plots."""
    start = time.perf_counter()
    config = dict(locals())
    del config["start"]
    check_ratio(ratio)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config["artifact_key"] = "selfprune-" + "".join(c if c.isalnum() else "-" for c in out_dir.name.lower())
    model_fp = model_fingerprint(model)
    setup = capture_statistics(model, model_fp, _calibration(config), device, dtype) | {"model_fp": model_fp}
    _search_objects(config, setup)  # validate every search setting before any long work

    progress = create_progress_artifact(0.0, key=f"{config['artifact_key']}-progress", description="generations done")
    members: list[dict] = []
    history, totals = [], {"evaluations": 0, "cache_hits": 0, "oracle_calls": 0, "oracle_replays": 0,
                        "oracle_fallbacks": 0}
    for g in range(generations + 1):
        result = generation(g, members, setup, config)
        members = result["population"]
        for k in totals:
            totals[k] += result[k]
        fitness = [m["fitness"] for m in members]
        history.append({"generation": g, "best": fitness[0], "mean": sum(fitness) / len(fitness)})
        update_progress_artifact(progress, 100.0 * (g + 1) / (generations + 1))
        print(f"generation {g}/{generations}: best {fitness[0]:.3f}, mean {history[-1]['mean']:.3f} | "
              f"{result['evaluations']} evaluated, {result['cache_hits']} from cache", flush=True)

    best = members[0]
    test, _ = _evaluate(config, setup, best["structure"], "test", test_windows)
    arch = Arch(**setup["arch"])
    uniform_structure = structure_to_json(rates_to_structure(arch, uniform(arch.n_layers, ratio)))
    uniform_fitness, _ = _evaluate(config, setup, uniform_structure, "fitness", fitness_windows)
    uniform_test, _ = _evaluate(config, setup, uniform_structure, "test", test_windows)
    summary = {
        "rates": best["rates"],
        "structure": best["structure"],
        "fitness": best["fitness"],
        "test_ppl": test["ppl"],
        "test_tokens": test["tokens"],
        "seqlen": seqlen,
        "uniform_fitness": uniform_fitness["ppl"],
        "uniform_test_ppl": uniform_test["ppl"],
        **totals,
        "wall_s": round(time.perf_counter() - start, 2),
        "history": history,
        "model_fingerprint": model_fp,
        "stats_key": setup["stats_key"],
        "config": {k: v for k, v in config.items() if k != "artifact_key"},
    }
    atomic_write_text(out_dir / "best.json", json.dumps(summary, indent=2))
    plot_history(history, out_dir / "fitness.png")
    plot_rates(best["rates"], ratio, out_dir / "rates.png")
    create_markdown_artifact(
        best_markdown(generations, best, arch.n_layers)
        + f"- test perplexity: **{test['ppl']:.4f}** (uniform Wanda-sp: {uniform_test['ppl']:.4f}), "
        f"{test['tokens']} tokens in {seqlen}-token windows\n- plots: `{out_dir / 'fitness.png'}`, `{out_dir / 'rates.png'}`\n",
        key=f"{config['artifact_key']}-final",
    )
    return summary
