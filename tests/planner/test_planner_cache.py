"""Plan cache: round trip, damaged files, concurrent writers, unwritable locations."""
import multiprocessing
import os
import warnings
from pathlib import Path

import msgpack
import pytest

from planner import SCHEMA_VERSION, LayerSignature, Plan, PlanCache, default_cache_path, token_bucket
from planner.cache import cache_key, fingerprint_key, hardware_fingerprint

FP = hardware_fingerprint(device="H100", world_size=8, local_size=8, links="W8|L8|intra=2^38",
                          torch_version="2.11.0", cuda_version="13.0")
SIG = LayerSignature(4096, 14336, 8, 2)
PLAN = Plan(adaptive_r=1, overlap_degree=2, a2a_algo="flat", expert_kernel="grouped")


def test_token_bucket_is_next_power_of_two():
    assert [token_bucket(t) for t in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == \
        [0, 1, 2, 4, 4, 8, 1024, 1024, 2048]
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        token_bucket(-1)


def test_default_path_respects_env_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTMOE_PLAN_CACHE", str(tmp_path / "explicit.msgpack"))
    assert default_cache_path() == tmp_path / "explicit.msgpack"
    monkeypatch.delenv("ADAPTMOE_PLAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "adaptmoe" / "plans.msgpack"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "adaptmoe" / "plans.msgpack"


def test_round_trip_across_instances(tmp_path):
    path = tmp_path / "plans.msgpack"
    cache = PlanCache(path)
    assert cache.get(FP, SIG, 4096) is None
    cache.put(FP, SIG, 4000, PLAN, predicted_ms=12.5)
    cache.put(FP, SIG, 100, Plan(), predicted_ms=1.0, measured_ms=1.2)
    again = PlanCache(path)
    entry = again.get(FP, SIG, 4096)             # 4000 and 4096 share a bucket
    assert entry.plan == PLAN and entry.predicted_ms == 12.5
    assert entry.source == "model" and entry.measured_ms is None and entry.token_bucket == 4096
    measured = again.get(FP, SIG, 128)
    assert measured.source == "measured" and measured.measured_ms == 1.2
    assert again.get(FP, LayerSignature(4096, 14336, 8, 2, training=False), 4096) is None
    assert again.get(dict(FP, torch="2.12.0"), SIG, 4096) is None
    raw = msgpack.unpackb(path.read_bytes())
    assert raw["schema"] == SCHEMA_VERSION and len(raw["entries"]) == 2


def test_lookup_is_served_from_memory_after_first_load(tmp_path):
    path = tmp_path / "plans.msgpack"
    PlanCache(path).put(FP, SIG, 64, PLAN, predicted_ms=1.0)
    cache = PlanCache(path)
    key = cache_key(fingerprint_key(FP), SIG, 64)       # what the runtime precomputes
    assert cache.get_by_key(key).plan == PLAN
    path.unlink()                                       # the hot path never rereads the file
    assert cache.get_by_key(key).plan == PLAN
    assert cache.get(fingerprint_key(FP), SIG, 64).plan == PLAN


def _write_then_open(path: Path, payload: bytes):
    path.write_bytes(payload)
    with pytest.warns(RuntimeWarning) as record:
        cache = PlanCache(path)
        assert cache.entries() == {}
    message = str(record[0].message)
    assert str(path) in message
    set_aside = list(path.parent.glob(path.name + ".bad-*"))
    assert len(set_aside) == 1 and set_aside[0].read_bytes() == payload
    assert not path.exists()
    cache.put(FP, SIG, 64, PLAN, predicted_ms=1.0)      # and it starts over cleanly
    assert PlanCache(path).get(FP, SIG, 64).plan == PLAN
    return message


def test_corrupt_file_is_moved_aside_with_a_warning(tmp_path):
    message = _write_then_open(tmp_path / "plans.msgpack", b"\xc1\xc1 this is not msgpack")
    assert "not a readable msgpack file" in message


def test_truncated_file_is_moved_aside(tmp_path):
    path = tmp_path / "plans.msgpack"
    PlanCache(path).put(FP, SIG, 64, PLAN, predicted_ms=1.0)
    whole = path.read_bytes()
    message = _write_then_open(path, whole[: len(whole) // 2])
    assert "not a readable msgpack file" in message


def test_wrong_schema_and_non_map_files_are_moved_aside(tmp_path):
    old = msgpack.packb({"schema": SCHEMA_VERSION + 100, "entries": {}})
    assert f"schema {SCHEMA_VERSION + 100}" in _write_then_open(tmp_path / "a.msgpack", old)
    assert "not a map" in _write_then_open(tmp_path / "b.msgpack", msgpack.packb([1, 2, 3]))
    assert "'entries'" in _write_then_open(tmp_path / "c.msgpack",
                                           msgpack.packb({"schema": SCHEMA_VERSION}))


def test_malformed_entries_are_skipped_and_the_rest_kept(tmp_path):
    path = tmp_path / "plans.msgpack"
    PlanCache(path).put(FP, SIG, 64, PLAN, predicted_ms=1.0)
    data = msgpack.unpackb(path.read_bytes())
    data["entries"]["junk"] = {"plan": {"adaptive_r": -5}}
    path.write_bytes(msgpack.packb(data))
    with pytest.warns(RuntimeWarning, match="skipped 1 malformed"):
        cache = PlanCache(path)
        assert cache.get(FP, SIG, 64).plan == PLAN


def _writer(path: str, name: str, count: int) -> None:
    cache = PlanCache(path)
    fp = dict(FP, device=name)
    for i in range(count):
        cache.put(fp, SIG, 2 ** i, Plan(adaptive_r=1, overlap_degree=1 + i % 2),
                  predicted_ms=float(i))


def test_two_processes_writing_at_once_keep_both_entry_sets(tmp_path):
    path = str(tmp_path / "plans.msgpack")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, name, 20)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the file is valid: no warning at all
        entries = PlanCache(path).entries()
    assert len(entries) == 40
    assert {e.fingerprint["device"] for e in entries.values()} == {"a", "b"}
    assert not list(tmp_path.glob("*.tmp-*"))           # no temp files left behind


def test_parent_is_a_file_warns_once_and_works_in_memory(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("I am a file")
    cache = PlanCache(blocker / "plans.msgpack")
    with pytest.warns(RuntimeWarning, match="not writable") as record:
        cache.put(FP, SIG, 64, PLAN, predicted_ms=1.0)
        cache.put(FP, SIG, 128, Plan(), predicted_ms=2.0)
    assert len([w for w in record if "not writable" in str(w.message)]) == 1
    assert cache.get(FP, SIG, 64).plan == PLAN
    assert cache.get(FP, SIG, 128).plan == Plan()
    assert blocker.read_text() == "I am a file"


def test_replace_denied_keeps_the_old_file_and_the_new_entry_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "plans.msgpack"
    PlanCache(path).put(FP, SIG, 64, PLAN, predicted_ms=1.0)
    before = path.read_bytes()

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", deny)
    cache = PlanCache(path)
    with pytest.warns(RuntimeWarning, match="not writable"):
        cache.put(FP, SIG, 4096, Plan(adaptive_r=0), predicted_ms=3.0)
    assert cache.get(FP, SIG, 4096).plan == Plan(adaptive_r=0)
    assert cache.get(FP, SIG, 64).plan == PLAN
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    path = tmp_path / "ro" / "plans.msgpack"
    PlanCache(path).put(FP, SIG, 64, PLAN, predicted_ms=1.0)
    path.parent.chmod(0o500)
    try:
        cache = PlanCache(path)
        with pytest.warns(RuntimeWarning, match="not writable"):
            cache.put(FP, SIG, 128, Plan(), predicted_ms=1.0)
        assert cache.get(FP, SIG, 64).plan == PLAN and cache.get(FP, SIG, 128) is not None
    finally:
        path.parent.chmod(0o700)


def test_clear_empties_disk_and_memory(tmp_path):
    path = tmp_path / "plans.msgpack"
    cache = PlanCache(path)
    cache.put(FP, SIG, 64, PLAN, predicted_ms=1.0)
    cache.put(FP, SIG, 128, PLAN, predicted_ms=1.0)
    assert cache.clear() == 2
    assert cache.entries() == {} and PlanCache(path).entries() == {}


def test_put_rejects_an_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        PlanCache(tmp_path / "p.msgpack").put(FP, SIG, 1, PLAN, 1.0, source="guess")


def test_nearest_fingerprint_absorbs_link_jitter_but_not_other_hardware():
    from planner import nearest_fingerprint
    stored = {"device": "H100", "world_size": 2, "local_size": 2, "torch": "2.11", "cuda": "13.0",
              "links": "W2|L2|intra.all_to_all=2^37|intra.all_gather=2^37|intra.reduce_scatter=2^37"}
    jittered = dict(stored, links="W2|L2|intra.all_to_all=2^38|intra.all_gather=2^36|intra.reduce_scatter=2^37")
    assert nearest_fingerprint(jittered, [stored]) == stored
    slower = dict(stored, links="W2|L2|intra.all_to_all=2^33|intra.all_gather=2^33|intra.reduce_scatter=2^33")
    assert nearest_fingerprint(slower, [stored]) == slower          # another interconnect: its own plans
    other_gpu = dict(jittered, device="H200")
    assert nearest_fingerprint(other_gpu, [stored]) == other_gpu
