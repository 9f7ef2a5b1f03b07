"""Reply parsing and repair: untrusted text in, feasible rate vectors (or rejections) out."""

from __future__ import annotations

import json
import math
import random

import pytest

from selfprune.evolve.prompts import evolution_prompt, initialization_prompt
from selfprune.evolve.replies import parse_candidates, repair

A = [0.1, 0.2, 0.3, 0.4]
B = [0.4, 0.3, 0.2, 0.1]


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"rates": [A, B]}),
        json.dumps([A, B]),
        "```json\n" + json.dumps({"rates": [A, B]}) + "\n```",
        "Sure! Here they are:\n```\n" + json.dumps([A, B]) + "\n```\nHope this helps.",
        "Let's think step by step. Layer 1 matters most.\n[0.1, 0.2, 0.3, 0.4]\n[0.4, 0.3, 0.2, 0.1]\nDone.",
        "Configuration1: [0.10000, 0.20000, 0.30000, 0.40000], Configuration2: [0.4 0.3 0.2 0.1]",
        '{"configurations": [{"rates": [0.1, 0.2, 0.3, 0.4]}, {"rates": [0.4, 0.3, 0.2, 0.1]}]}',
        'Answer: {"rates": [["0.1", "0.2", "0.3", "0.4"], [0.4, 0.3, 0.2, 0.1]]} (strings in the first)',
    ],
)
def test_parse_accepts_json_fences_and_prose(text):
    assert parse_candidates(text, 4) == [A, B]


def test_parse_prefers_the_reading_with_the_right_length():
    # The only JSON object holds a short list; the prose reading has the real candidate.
    text = 'I pruned {"layers": [1, 2]} as follows: [0.1, 0.2, 0.3, 0.4]'
    assert parse_candidates(text, 4) == [[1.0, 2.0], A]


@pytest.mark.parametrize("text", ["", "   ", "I cannot help with that.", "[a, b, c]", "{not json", "[]", None])
def test_parse_garbage_yields_nothing(text):
    assert parse_candidates(text, 4) == []


def test_parse_returns_wrong_lengths_for_repair_to_count():
    assert parse_candidates("[0.1, 0.2] [0.3]", 4) == [[0.1, 0.2], [0.3]]


def _feasible(rates, n, beta, p_max):
    return len(rates) == n and all(0.0 <= r <= p_max for r in rates) and abs(sum(rates) / n - beta) < 1e-6


def test_repair_rejects_wrong_length_and_non_finite():
    valid, rejected = repair([A, [0.3] * 3, [0.3, math.nan, 0.3, 0.3], [0.3, math.inf, 0.3, 0.3]], 4, 0.25, 0.9)
    assert rejected == 3 and len(valid) == 1


def test_repair_keeps_a_feasible_vector_unchanged():
    (out,), _ = repair([A], 4, 0.25, 0.9)
    assert out == pytest.approx(A, abs=1e-9)


def test_repair_clips_then_shifts_uniformly():
    # 5.0 is read as "as much as allowed" (0.9); then every rate shifts by one common t.
    (out,), rejected = repair([[5.0, 0.1, 0.1, -1.0]], 4, 0.3, 0.9)
    assert rejected == 0 and _feasible(out, 4, 0.3, 0.9)
    assert out[0] == pytest.approx(0.9) and out[1] == pytest.approx(out[2])


def test_repair_fixes_mean_drift_with_a_common_shift():
    drifted = [0.3, 0.4, 0.5, 0.6]  # mean 0.45
    (out,), _ = repair([drifted], 4, 0.3, 0.9)
    shifts = [o - d for o, d in zip(out, drifted)]
    assert shifts == pytest.approx([-0.15] * 4)


@pytest.mark.parametrize("seed", range(20))
def test_repair_property_random_inputs_always_feasible(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    beta = rng.uniform(0.05, 0.85)
    p_max = rng.uniform(beta, 1.0)
    cands = [[rng.uniform(-2.0, 3.0) for _ in range(n)] for _ in range(5)]
    valid, rejected = repair(cands, n, beta, p_max)
    assert rejected == 0 and len(valid) == 5
    assert all(_feasible(v, n, beta, p_max) for v in valid)


def test_prompts_carry_the_placeholders_and_the_json_instruction():
    init = initialization_prompt("Llama-2-7B", 32, 30, 0.3, 0.9, "WikiText-2")
    assert "Llama-2-7B" in init and "32 transformer layers" in init and "generate 30 valid" in init
    assert "equals 0.3" in init and "between 0 and 0.9" in init and '"rates"' in init
    evo = evolution_prompt("crossover", "Llama-2-7B", 2, [([0.1, 0.5], 12.5), ([0.3, 0.3], 11.0)], 10, 0.3, 0.9)
    assert "perform the crossover operation" in evo and "exactly 10 new configurations" in evo
    assert "Configuration2: [0.30000, 0.30000], Fitness2: 11.0000" in evo and "receive 2 lists" in evo
