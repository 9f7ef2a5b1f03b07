"""Content-hash-cached Prefect tasks: how a cache key is made, and why resume survives SIGKILL.

What goes into each of this project's keys (its ``key_fn``) is built in :mod:`selfprune.engine.identity`.

Declare a task with ``@cached_task(...)`` (or pass ``cache_policy=content_cache(...)`` to
``@task`` yourself)::

    @cached_task(key_fn=lambda model_fp, units, settings, **_: (model_fp, units, settings), version="1")
    def score_candidate(model, model_fp: str, units: dict, settings: dict) -> dict: ...

The cache key
    ``<namespace>-<content_hash(namespace, version, payload)>`` where ``payload``
    is ``key_fn(**task_parameters)`` (or the parameters named in ``include``, or, with neither,
    all parameters). It is built only from small explicit values (str, numbers, bool, None and
    lists/dicts of them, or objects with ``to_dict()``) through ``selfprune.storage.hashing``: a tensor
    or a model reaching the key raises ``TypeError`` instead of being cloudpickled (torch
    pickles are not deterministic). Never in the key: the flow or task run id (Prefect's
    DEFAULT policy has RUN_ID, so a rerun after preemption would miss), the task's source
    (TASK_SOURCE hashes only its own body; each task's own ``version=`` is the explicit knob:
    bump it when a change alters what that task returns), or tensors. What changes the numbers
    (the resolved device kind and dtype, the method's version, data fingerprints) belongs in the
    payload. ``namespace`` defaults to the function's ``module.qualname``,
    so two tasks with equal inputs never share a result file (give ``namespace=`` explicitly
    for a task in a script, whose module is ``__main__`` when run but not when imported). If the key cannot be built (a
    tensor in it, say), a ``cached_task`` fails with ``TypeError``; a bare ``content_cache``
    policy on a plain ``@task`` only gets Prefect's behaviour: a logged traceback and an
    uncached run.

Results
    Persisted (``persist_result=True``) under ``PREFECT_LOCAL_STORAGE_PATH`` (see
    ``selfprune.tasks.prefect_env``), one file per key, with a plain JSON serializer (no pickle, no
    Prefect object hooks; the one thing it encodes beyond JSON is the exception of a failed run,
    which Prefect persists with the same serializer, and it reads that back as a plain dict). The
    task's return value is round-tripped through JSON on its first run too, so a fresh result and a
    cached one are identical (a tuple comes back as a list both times) and a non-JSON return fails
    at once, not on resume. Tensors go to ``selfprune.storage.store``; the task returns their key.

Reading results: the file never chooses its decoder
    Prefect decodes a result file with the serializer named *inside* the file, and with pickle
    when it names none; even "json" names an ``object_decoder`` that Prefect imports and calls on
    every decoded object. So whoever can write the results directory could run code in the next
    run. selfprune reads every result as plain JSON (:func:`trusted_record`), whatever the file
    says, and refuses a file that names anything but the JSON it writes itself (this module's
    serializer for cached tasks, Prefect's JSON for flow results): a refused cached result is set
    aside as ``<key>.untrusted-<time>`` with a warning and recomputed, like a corrupt one.
    :func:`guard_prefect_results` makes Prefect's own reads (cache lookups, a flow's result read
    back when a parent run is retried) use the same reader; its docstring says why that is a patch.

Locks: why READ_COMMITTED and no lock manager
    Prefect's SERIALIZABLE isolation needs a lock manager; ``FileSystemLockManager`` writes a
    lock file per key with no expiry (the transaction never passes a hold timeout) and deletes
    it only on a clean exit. After SIGKILL (preemption, OOM killer) the file stays and the
    rerun waits on it forever (measured: the rerun hangs on the in-flight task's key). With
    READ_COMMITTED (set explicitly here, so no parent transaction can change it) there are no
    locks to leak: a rerun finds every committed result and recomputes only what had not
    committed, i.e. the task that was in flight. A result file half-written at the kill
    (Prefect's local writes are not atomic) fails to parse, which Prefect treats as a miss, and
    is overwritten. The price: two processes that start the *same* key at the same moment both
    compute it (equal results, last write wins). Candidates in this project are distinct keys
    handled by one worker per loaded model, so that duplicate work is at most the in-flight task.
    A lease-based lock (a hold timeout, or breaking locks whose holder pid is dead) would also
    survive SIGKILL but adds a wait equal to the lease after every kill, for no gain here.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.serializers import JSONSerializer

from selfprune.storage.hashing import content_hash
from selfprune.tasks.prefect_env import results_dir

if TYPE_CHECKING:
    from prefect.results import ResultRecord

logger = logging.getLogger("selfprune.cache")


def encode_exception(obj: Any) -> Any:
    """The only object the results serializer encodes: an exception, as Prefect's JSON serializer
    writes one (``{"__exc_type__": ..., "message": ...}``). Prefect persists a failed task's
    exception with the task's serializer; without this, every failure of a cached task (an
    oracle that stays down, say) also logged "Failed to serialize object of type ...". Return
    values never get here: they are checked to be plain JSON first."""
    if isinstance(obj, BaseException):
        return {"__exc_type__": f"{type(obj).__module__}.{type(obj).__qualname__}", "message": str(obj)}
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


# Plain json on read: no object decoder, so nothing is imported or built when a result is read
# (a persisted exception reads back as its {"__exc_type__", "message"} dict).
JSON_RESULTS = JSONSerializer(object_encoder=f"{__name__}.encode_exception", object_decoder=None)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text.rsplit(".", 1)[-1])[:40] or "task"


@dataclass
class ContentCache(CachePolicy):
    """Cache key = content hash of explicit small inputs + the task's version (see module doc)."""

    key_fn: Callable[..., Any] | None = None
    include: Sequence[str] | None = None
    namespace: str | None = None
    version: str = ""
    isolation_level: Any = "READ_COMMITTED"

    def payload(self, inputs: dict[str, Any]) -> Any:
        if self.key_fn is not None:
            return self.key_fn(**inputs)
        if self.include is not None:
            missing = [name for name in self.include if name not in inputs]
            if missing:
                raise KeyError(f"content_cache include names unknown parameters {missing}")
            return {name: inputs[name] for name in self.include}
        return dict(inputs)

    def key_for(self, namespace: str, inputs: dict[str, Any]) -> str:
        digest = content_hash(namespace, self.version, self.payload(inputs), length=32)
        return f"{_slug(namespace)}-{digest}"

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        namespace = self.namespace
        if namespace is None:
            fn = getattr(getattr(task_ctx, "task", None), "fn", None)
            fn = inspect.unwrap(fn) if fn is not None else None
            if fn is None:
                raise ValueError("content_cache needs a namespace outside a task run")
            namespace = f"{fn.__module__}.{fn.__qualname__}"
        key = self.key_for(namespace, inputs or {})
        set_aside_if_corrupt(key)
        return key


class UntrustedResult(ValueError):
    """A persisted result that names a serializer selfprune does not write: never decoded."""


# The decoders of the JSON that selfprune writes: none (cached tasks, JSON_RESULTS) and Prefect's
# (flow results: PREFECT_RESULTS_DEFAULT_SERIALIZER=json). Either way it is read back as plain JSON.
_OWN_JSON_DECODERS = (None, "prefect.serializers.prefect_json_object_decoder")


def _refusal(serializer: Any) -> str | None:
    """Why a result file's ``serializer`` entry is not one selfprune wrote (None when it is)."""
    if not isinstance(serializer, dict):
        return "names no serializer, which Prefect would read as pickle"
    if serializer.get("type") != "json":
        return f"names the {str(serializer.get('type'))[:40]!r} serializer"
    if (serializer.get("jsonlib", "json") != "json" or serializer.get("object_decoder") not in _OWN_JSON_DECODERS
            or serializer.get("loads_kwargs")):
        return f"names a JSON serializer with a decoder of its own ({str(serializer.get('object_decoder'))[:60]!r})"
    return None


def _record(document: Any) -> ResultRecord:
    """A ResultRecord from a parsed result file, its value decoded as plain JSON.

    A file that is not a record (a flow's result: Prefect keeps its metadata in its database) is
    the value itself. Raises UntrustedResult for a record naming another serializer, ValueError
    for a malformed one."""
    from prefect.results import ResultRecord, ResultRecordMetadata

    if not (isinstance(document, dict) and {"result", "data"} & document.keys()):
        return ResultRecord(metadata=ResultRecordMetadata(serializer=JSON_RESULTS), result=document)
    metadata = document.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    why = _refusal(metadata.get("serializer", document.get("serializer")))
    if why:
        raise UntrustedResult(why)
    payload = document.get("result", document.get("data"))
    if not isinstance(payload, str):
        raise ValueError(f"its value is {type(payload).__name__}, not serialized text")
    fields = {k: metadata[k] for k in ("storage_key", "expiration", "prefect_version", "storage_block_id") if k in metadata}
    return ResultRecord(metadata=ResultRecordMetadata(**fields, serializer=JSON_RESULTS),
                        result=JSON_RESULTS.loads(payload.encode()))


def trusted_record(data: bytes) -> ResultRecord:
    """The ResultRecord in a result file's bytes, read the only way selfprune reads one: plain JSON,
    nothing imported or called, whatever serializer the file names (see the module doc)."""
    return _record(json.loads(data))


def _prefect_deserialize(cls: type, data: bytes, backup_serializer: Any = None) -> ResultRecord:
    """Stands in for ``ResultRecord.deserialize``; ``backup_serializer`` is ignored: plain JSON only."""
    return _logged_refusal(lambda: trusted_record(data))


def _prefect_deserialize_split(cls: type, result: bytes, metadata: bytes) -> ResultRecord:
    """Stands in for ``ResultRecord.deserialize_from_result_and_metadata`` (a cache policy with
    ``key_storage`` keeps the metadata in a file of its own)."""
    return _logged_refusal(lambda: _record({"metadata": json.loads(metadata), "result": result.decode()}))


def _logged_refusal(read: Callable[[], Any]) -> Any:
    """``read()``; a refusal is also logged, since Prefect takes some read failures for a silent miss."""
    try:
        return read()
    except UntrustedResult as exc:
        logger.warning("refused a persisted Prefect result that %s; selfprune reads results only as plain JSON. "
                       "Check who can write %s", exc, results_dir())
        raise


def guard_prefect_results() -> None:
    """Make Prefect decode every persisted result with :func:`trusted_record` (idempotent).

    Why this is a patch: Prefect takes the decoder from the file and has no setting, result store,
    storage block or serializer registry that can restrict it. A store's serializer is only the
    fallback for a file without metadata; a storage block covers only the stores given it (a
    flow's result read back from the API goes through a plain ``LocalFileSystem``); and a file
    naming no serializer is unpickled by the metadata's default, with no registry lookup. Every
    read of a result file (``ResultStore.read``/``exists``, a state's ``result()``) decodes it
    through these two classmethods of ``ResultRecord``, so they are replaced, here only.
    """
    from prefect.results import ResultRecord

    if getattr(ResultRecord.deserialize, "__func__", None) is not _prefect_deserialize:
        ResultRecord.deserialize = classmethod(_prefect_deserialize)
        ResultRecord.deserialize_from_result_and_metadata = classmethod(_prefect_deserialize_split)


def set_aside_if_corrupt(key: str) -> None:
    """A cached result that no longer parses (a disk fault, a truncated copy) is renamed to
    ``<key>.corrupt-<time>`` with a warning, so the task recomputes it. Prefect alone would treat
    it as a silent miss and overwrite it; this way the fault is seen and nothing is deleted.
    One naming another serializer (planted: selfprune never writes one) is never decoded: it is
    set aside the same way, as ``<key>.untrusted-<time>``."""
    path = results_dir() / key
    try:
        trusted_record(path.read_bytes())
    except FileNotFoundError:
        return
    except UntrustedResult as exc:
        aside = _set_aside(path, "untrusted")
        logger.warning("cached result %s %s, which selfprune never writes (planted, or written by another program); "
                       "not read: recomputing it, the file is kept as %s. Check who can write %s",
                       path, exc, aside.name, path.parent)
    except Exception as exc:  # noqa: BLE001 - any unreadable record is the same fault
        aside = _set_aside(path, "corrupt")
        logger.warning("cached result %s is corrupt (%s: %s); recomputing it, the bad file is kept as %s",
                       path, type(exc).__name__, (str(exc).splitlines() or [""])[0][:200], aside.name)


def _set_aside(path: Path, why: str) -> Path:
    aside = path.with_name(f"{path.name}.{why}-{int(time.time())}")
    path.replace(aside)
    return aside


def kept_result(state) -> Any:
    """``state.result()``, once its cached copy is on disk and whole.

    Prefect logs a result it could not write ("Execution will continue, but the result has not
    been persisted") and goes on; a search that went on without its cache would redo all that work
    after the next preemption, so a lost write stops the run here, naming the path (and the full
    disk, when that is the cause)."""
    from selfprune.core.errors import EnvironmentFault
    from selfprune.storage.preflight import full_device, no_space

    value = state.result()
    key = getattr(getattr(state.data, "metadata", None), "storage_key", None)
    if state.name == "Cached" or key is None:
        return value
    path = results_dir() / key
    try:
        trusted_record(path.read_bytes())
    except Exception:  # noqa: BLE001 - missing or partial: the write failed
        full = full_device([path.parent])
        if full is not None:
            raise no_space(full, f"the cached result {path.name} could not be written") from None
        raise EnvironmentFault(f"the cached result {path} could not be written (Prefect's warning above says why); "
                               "check that directory's disk and permissions, then rerun") from None
    return value


def content_cache(
    key_fn: Callable[..., Any] | None = None,
    *,
    include: Sequence[str] | None = None,
    namespace: str | None = None,
    version: str = "",
) -> ContentCache:
    """A Prefect cache policy keyed on explicit inputs; ``key_fn`` gets the task's parameters
    as keyword arguments (accept ``**_`` for the ones it ignores)."""
    if key_fn is not None and include is not None:
        raise ValueError("give key_fn or include, not both")
    return ContentCache(key_fn=key_fn, include=tuple(include) if include is not None else None,
                        namespace=namespace, version=version)


def _json_roundtrip(value: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cached task {name!r} returned {type(value).__name__}, which is not plain JSON ({exc}). "
            "Return dicts/lists/str/numbers/bool/None; put tensors in selfprune.storage.store "
            "and return their key."
        ) from exc


def _checked_json_returning(fn: Callable[..., Any], check_key: Callable[[dict[str, Any]], str]) -> Callable[..., Any]:
    """Wrap ``fn``: first build its cache key (so a tensor in the key fails the task instead of
    Prefect logging it and running uncached), then JSON-round-trip what it returns."""
    name = getattr(fn, "__qualname__", repr(fn))
    sig = inspect.signature(fn)

    def check(args: tuple, kwargs: dict) -> None:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            check_key(dict(bound.arguments))
        except (TypeError, ValueError, KeyError) as exc:
            raise TypeError(f"cached task {name!r}: cannot build its cache key: {exc}") from exc

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check(args, kwargs)
        return _json_roundtrip(fn(*args, **kwargs), name)

    return wrapper


def cached_task(
    fn: Callable[..., Any] | None = None,
    *,
    key_fn: Callable[..., Any] | None = None,
    include: Sequence[str] | None = None,
    namespace: str | None = None,
    version: str,
    **task_kwargs: Any,
):
    """``@task`` with a content cache, persisted plain-JSON results and a JSON-only return value.

    ``version`` is required: the task's own cache version, bumped when what it returns changes.

    Other ``@task`` options (``name``, ``retries``, ``refresh_cache``, ...) pass through.
    """

    def decorate(f: Callable[..., Any]):
        guard_prefect_results()  # any process with a cached task reads results only as plain JSON
        ns = namespace or f"{f.__module__}.{f.__qualname__}"
        policy = content_cache(key_fn, include=include, namespace=ns, version=version)
        opts: dict[str, Any] = dict(
            name=f.__name__,
            cache_policy=policy,
            persist_result=True,
            result_serializer=JSON_RESULTS,
        )
        opts.update(task_kwargs)
        return task(**opts)(_checked_json_returning(f, functools.partial(policy.key_for, ns)))

    return decorate(fn) if fn is not None else decorate
