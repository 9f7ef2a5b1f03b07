"""Trust boundary of the task cache: a planted result file is never decoded by what it names.

Prefect decodes a result file with the serializer named inside that file (and with pickle when
it names none), so whoever can write ``$SELFPRUNE_HOME/results`` could run code in the next
search. Each test plants a real hostile record, built with Prefect's own classes, where a real
run will read it, and checks that the payload never ran (its marker file is absent).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import stat

import pytest
from helpers import environ

from selfprune.tasks.caching import cached_task


class Touch:
    """Unpickling this creates ``path``: the stand-in for any code a pickle can run."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def pickled(marker: pathlib.Path, storage_key: str) -> bytes:
    """The record Prefect itself writes for a pickled result."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    return ResultRecord(metadata=ResultRecordMetadata(storage_key=storage_key, serializer=PickleSerializer()),
                        result=Touch(marker)).serialize()


def compressed_pickle(marker: pathlib.Path, storage_key: str) -> bytes:
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import CompressedPickleSerializer

    return ResultRecord(metadata=ResultRecordMetadata(storage_key=storage_key, serializer=CompressedPickleSerializer()),
                        result=Touch(marker)).serialize()


def unnamed(marker: pathlib.Path, storage_key: str) -> bytes:
    """A pickled record that names no serializer: Prefect's default for that is pickle."""
    record = json.loads(pickled(marker, storage_key))
    del record["metadata"]["serializer"]
    return json.dumps(record).encode()


def json_with_hook(marker: pathlib.Path, storage_key: str) -> bytes:
    """A record naming the JSON serializer with ``subprocess.run`` as its object hook: each decoded
    dict becomes a command line (its keys), so "json" alone is no guarantee either."""
    from prefect.results import ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    serializer = JSONSerializer(object_decoder="subprocess.run")
    metadata = ResultRecordMetadata(storage_key=storage_key, serializer=serializer)
    payload = json.dumps({"touch": 0, str(marker): 0})
    return json.dumps({"metadata": json.loads(metadata.dump_bytes()), "result": payload}).encode()


HOSTILE = {"pickle": pickled, "compressed-pickle": compressed_pickle, "no-serializer": unnamed,
           "json-object-hook": json_with_hook}


@cached_task(key_fn=lambda x, tag, **_: {"x": x, "tag": tag}, namespace="trust_toy", version="1")
def toy_double(x: int, tag: str, counter: str) -> dict:
    with open(counter, "a") as fh:
        fh.write(f"{x}\n")
    return {"x": x, "double": 2 * x}


def run_toy(x: int, tag: str, counter: pathlib.Path) -> tuple[dict, str]:
    """One real flow run of the cached task: (its value, the name of its result file)."""
    from prefect import flow

    @flow(name="trust-toy")
    def double_one(x: int, tag: str, counter: str):
        return toy_double(x, tag, counter, return_state=True)

    state = double_one(x, tag, str(counter))
    return state.result(), state.data.metadata.storage_key


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_planted_result_record_never_runs_and_is_recomputed(prefect_api, tmp_path, caplog, kind):
    from selfprune.tasks.prefect_env import results_dir

    counter, marker = tmp_path / "counter", tmp_path / "marker"
    first, key = run_toy(7, kind, counter)
    assert first == {"x": 7, "double": 14}
    path = results_dir() / pathlib.Path(key).name
    assert path.is_file()
    path.write_bytes(HOSTILE[kind](marker, key))  # at the exact key the next run looks up

    with caplog.at_level(logging.WARNING, logger="selfprune.cache"):
        again, _ = run_toy(7, kind, counter)
    assert not marker.exists(), f"the planted {kind} record ran its payload"
    assert again == first
    assert counter.read_text().split() == ["7", "7"]  # recomputed, not taken from the planted file
    assert any(path.name in r.getMessage() and "serializer" in r.getMessage() for r in caplog.records), caplog.text
    [aside] = path.parent.glob(path.name + ".untrusted-*")  # kept aside for inspection, not deleted
    assert b"metadata" in aside.read_bytes()
    assert json.loads(path.read_text())["metadata"]["serializer"]["object_decoder"] is None  # rewritten as plain JSON


def test_prefect_reading_a_planted_flow_result_runs_nothing(prefect_api, tmp_path):
    """A flow's persisted result is read back by Prefect itself (a parent run retried reuses its
    finished subflows' results): that read never decodes with the serializer the file names."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from selfprune.tasks.caching import UntrustedResult

    @flow(name="trust-toy-flow")
    def summary(x: int) -> dict:
        return {"x": x}

    state = summary(3, return_state=True)
    key = state.data.metadata.storage_key
    marker = tmp_path / "marker"
    pathlib.Path(key).write_bytes(pickled(marker, key))
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(state.state_details.flow_run_id).state
    with pytest.raises(UntrustedResult, match="pickle"):
        stored.result(retry_result_failure=False)
    assert not marker.exists()


@pytest.fixture
def isolated_prefect_env():
    """configure() may set these; restore them afterwards."""
    names = ("PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_PROFILES_PATH")
    with environ(**dict.fromkeys(names)):
        yield
    from selfprune.tasks import prefect_env

    prefect_env.refresh()


def test_a_results_directory_others_can_write_is_named_at_start(tmp_path, caplog, isolated_prefect_env):
    from selfprune.tasks import prefect_env

    home = tmp_path / "home"
    (home / "results").mkdir(parents=True)
    (home / "results").chmod(0o777)  # as after a careless `chmod -R 777` or a shared scratch space
    with caplog.at_level(logging.WARNING):
        prefect_env.configure(home, user_profiles=False)
    lines = [r.getMessage() for r in caplog.records if str(home / "results") in r.getMessage()]
    assert len(lines) == 1 and "is writable by others" in lines[0] and f"chmod 700 {home / 'results'}" in lines[0], caplog.text
    assert "\n" not in lines[0]
    assert stat.S_IMODE((home / "results").stat().st_mode) == 0o777  # named, not changed behind the user's back
    assert not [r for r in caplog.records if str(home / "prefect") in r.getMessage()]  # created private: no warning


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_home_another_user_owns_is_named_at_start(tmp_path, caplog, isolated_prefect_env):
    from selfprune.tasks import prefect_env

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, 65534, 65534)
    with caplog.at_level(logging.WARNING):
        prefect_env.configure(home, user_profiles=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(str(home) + " ")]
    assert len(lines) == 1 and "owned by uid 65534" in lines[0], caplog.text


def test_prefect_result_store_and_split_records_never_decode_what_the_file_names(tmp_path):
    """Prefect's own readers (a store's exists/read, a record kept apart from its metadata) go
    through the same plain-JSON reader, with no flow and no server."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultRecord, ResultStore

    from selfprune.tasks.caching import UntrustedResult

    marker = tmp_path / "marker"
    hostile = pickled(marker, "planted")
    (tmp_path / "planted").write_bytes(hostile)
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    assert not store.exists("planted")
    with pytest.raises(UntrustedResult, match="pickle"):
        store.read("planted")
    record = json.loads(hostile)
    with pytest.raises(UntrustedResult, match="pickle"):
        ResultRecord.deserialize_from_result_and_metadata(result=record["result"].encode(),
                                                          metadata=json.dumps(record["metadata"]).encode())
    assert not marker.exists()
