"""Subprocess entry for tests/test_prefect_infra.py: flows of slow, content-cached toy tasks.

    python tests/prefect_resume_flow.py --n 12 --sleep 0.3 --counter C --out O [--salt S]

Each real execution of ``toy_score`` appends "<x> <pid>" to the counter file *before* it sleeps,
so a run killed mid-task shows that task as started. The flow's result goes to ``--out`` as JSON.
``toy_search`` (a subflow per generation, generation 1 failing once) is the entrypoint the
retry test hands to ``prefect flow-run retry --entrypoint``. ``--serializable LOCKDIR``
switches the cache to SERIALIZABLE + FileSystemLockManager (the design that does NOT survive
SIGKILL: the rerun hangs on the killed task's lock file), for investigation only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from selfprune.tasks import prefect_env

if __name__ == "__main__":
    prefect_env.configure(user_profiles=False)  # SELFPRUNE_HOME and explicit PREFECT_* from the caller win

from prefect import flow, task  # noqa: E402

from selfprune.tasks.caching import JSON_RESULTS, cached_task, content_cache  # noqa: E402


def toy_value(x: int, salt: str) -> dict:
    """What toy_score returns: depends on x only (the salt only separates cache keys)."""
    return {"x": x, "score": round((x * 37 % 11) / 7.0, 6)}


def _toy_score(x: int, salt: str, sleep: float, counter: str) -> dict:
    with open(counter, "a") as fh:
        fh.write(f"{x} {os.getpid()}\n")
        fh.flush()
        os.fsync(fh.fileno())
    time.sleep(sleep)
    return toy_value(x, salt)


# Keyed on (x, salt) only: the counter path and the sleep are plumbing, not inputs.
toy_score = cached_task(_toy_score, key_fn=lambda x, salt, **_: {"x": x, "salt": salt}, namespace="toy_score", version="1")


@flow(name="toy-resume")
def resume_flow(n: int, salt: str, sleep: float, counter: str) -> list[dict]:
    scorer = _SCORER or toy_score
    return [scorer(x, salt=salt, sleep=sleep, counter=counter) for x in range(n)]


_SCORER = None  # replaced by --serializable


@flow(name="toy-generation")
def toy_generation(gen: int, per_gen: int, salt: str, counter: str, marker: str) -> list[dict]:
    """One "generation": scores per_gen candidates; generation 1 fails once, mid-way."""
    out = []
    for c in range(per_gen):
        out.append(toy_score(100 * gen + c, salt=salt, sleep=0.0, counter=counter))
        if gen == 1 and c == 1 and not Path(marker).exists():
            Path(marker).write_text("failed once\n")
            raise RuntimeError("injected failure in generation 1")
    return out


@flow(name="toy-search")
def toy_search(gens: int, per_gen: int, salt: str, counter: str, marker: str) -> list[list[dict]]:
    """A parent flow with a subflow per generation: retrying it reuses completed subflow runs."""
    return [toy_generation(g, per_gen, salt, counter, marker) for g in range(gens)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--sleep", type=float, default=0.3)
    ap.add_argument("--salt", default="s0")
    ap.add_argument("--counter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--serializable", default=None, help="lock dir: SERIALIZABLE + FileSystemLockManager")
    args = ap.parse_args()
    global _SCORER
    if args.serializable:
        from prefect.locking.filesystem import FileSystemLockManager

        policy = content_cache(lambda x, salt, **_: {"x": x, "salt": salt}, namespace="toy_score_serializable")
        policy = policy.configure(isolation_level="SERIALIZABLE", lock_manager=FileSystemLockManager(Path(args.serializable)))
        _SCORER = task(_toy_score, name="toy_score", cache_policy=policy, persist_result=True, result_serializer=JSON_RESULTS)
    result = resume_flow(args.n, args.salt, args.sleep, args.counter)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
