"""Staged fitness (EvoPress's multi-step selection): cheap windows for every new candidate, the full
fitness only for the most promising."""

from __future__ import annotations

import pytest
from helpers import run_cli

from selfprune import search
from selfprune.config import SearchConfig
from selfprune.engine.candidate import from_json
from selfprune.engine.models import load_model
from selfprune.engine.settings import Calibration, Scoring
from selfprune.engine.workbench import Workbench
from selfprune.evolve.pipeline import staged


def test_each_stage_keeps_the_best_fraction_and_only_survivors_get_the_full_fitness():
    calls = []

    def measure(batch, windows):
        calls.append((list(batch), windows))
        return [v * windows for v in batch]  # lower is better, the ranking is the same at any windows

    # stage 1 on 1 window keeps ceil(0.5 * 6) = 3 of [5, 3, 9, 1, 7, 2]: the values 1, 2, 3 (positions 3, 5, 1);
    # stage 2 on 2 windows keeps ceil(0.4 * 3) = 2 of them: 1 and 2; only those are scored on all 4 windows
    evaluate = staged(measure, [(1, 0.5), (2, 0.4)], 4)
    assert evaluate([5, 3, 9, 1, 7, 2]) == [None, None, None, 4, None, 8]
    assert calls == [([5, 3, 9, 1, 7, 2], 1), ([3, 1, 2], 2), ([1, 2], 4)]
    # no stages: every candidate on the full windows, as before
    assert staged(measure, [], 4)([5, 3]) == [20, 12]
    # NaN (a broken candidate) ranks last, and one candidate always survives
    assert staged(lambda b, w: [float("nan") if v < 0 else v for v in b], [(1, 0.1)], 2)([-1, 3, 4]) == [None, 3, None]


@pytest.mark.parametrize("stages, fitness_windows", [
    (["4:0.5"], 4), (["2:0.5", "1:0.5"], 4), (["0:0.5"], 4), (["1:1.5"], 4), (["1:0"], 4), (["one"], 4),
])
def test_a_bad_schedule_is_refused(stages, fitness_windows):
    with pytest.raises(ValueError, match="fitness-stages"):
        SearchConfig(fitness_stages=stages, fitness_windows=fitness_windows)


def test_a_bad_schedule_exits_2(capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "search", "--fitness-stages", "8:0.5", "--fitness-windows", "4")
    assert code == 2 and "WINDOWS rising and below --fitness-windows" in err and "Traceback" not in err


def test_a_staged_search_spends_fewer_tokens_and_keeps_full_fitness_in_the_population(tiny_workspace, tmp_path):
    ws = tiny_workspace
    common = dict(model=str(ws / "model"), data=str(ws / "corpus.txt"), ratio=0.4, samples=4, calib_seqlen=64,
                  seqlen=64, fitness_windows=4, test_windows=2, population=4, mutations=4, crossovers=4,
                  generations=2, device="cpu")
    single = search(out=str(tmp_path / "single"), **common)
    multi = search(out=str(tmp_path / "staged"), fitness_stages=["1:0.5"], **common)
    again = search(out=str(tmp_path / "again"), fitness_stages=["1:0.5"], **common)
    assert (again.rates, again.fitness) == (multi.rates, multi.fitness)  # deterministic
    # a quarter of the windows for every new candidate, all of them for half of them: fewer tokens
    assert multi.record.fitness_tokens < single.record.fitness_tokens
    # the best's fitness is its perplexity on all 4 fitness windows, not a screening score
    bench = Workbench(load_model(str(ws / "model"), "cpu"), Calibration(str(ws / "corpus.txt"), 4, 64))
    full = bench.score(from_json(multi.structure), Scoring(str(ws / "corpus.txt"), "fitness", 64, 4, 4))
    assert full.ppl == pytest.approx(multi.fitness, rel=1e-9)
