"""Plan cache: one msgpack file of chosen plans, keyed by hardware, layer signature, token bucket.

File: {"schema": SCHEMA_VERSION, "entries": {key: entry}}. Writers take an advisory lock on a
side file, re-read and merge under it, then replace the file atomically (temp file in the same
directory, fsync, os.replace): concurrent writers never corrupt it or lose each other's entries,
and readers never need the lock. A corrupt, truncated or other-schema file is moved aside to
`<path>.bad-<timestamp>` with a warning; an unwritable location warns once and the cache keeps
working in memory. Nothing here raises on a bad cache: a plan cache must never stop training.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import msgpack

from planner.plan import LayerSignature, Plan

SCHEMA_VERSION = 1
ENV_VAR = "ADAPTMOE_PLAN_CACHE"
SOURCES = ("model", "measured")
Fingerprint = Union[dict, str]   # plain-data hardware description, or its precomputed key


def default_cache_path() -> Path:
    """$ADAPTMOE_PLAN_CACHE, else $XDG_CACHE_HOME/adaptmoe/plans.msgpack, else ~/.cache/..."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adaptmoe" / "plans.msgpack"


def token_bucket(tokens: int) -> int:
    """Next power of two >= tokens (0 -> 0, 1 -> 1): nearby batch sizes share one plan."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return 0 if tokens == 0 else 1 << (int(tokens) - 1).bit_length()


def hardware_fingerprint(*, device: str, world_size: int, local_size: int, links: str,
                         torch_version: str, cuda_version: str | None) -> dict[str, Any]:
    """The fingerprint the runtime should pass: links = Topology.fingerprint_bucket()."""
    return {"device": device, "world_size": world_size, "local_size": local_size,
            "links": links, "torch": torch_version, "cuda": cuda_version or "none"}


def _link_exponents(links: str) -> tuple[tuple[str, ...], dict[str, int]] | None:
    """('W2', 'L2', ...) and {'intra.all_to_all': 29, ...} from Topology.fingerprint_bucket()."""
    fixed, exps = [], {}
    for part in links.split("|"):
        name, sep, value = part.partition("=2^")
        if not sep:
            fixed.append(part)
            continue
        try:
            exps[name] = int(value)
        except ValueError:
            return None
    return tuple(fixed), exps


def nearest_fingerprint(fingerprint: dict[str, Any], known: list[dict[str, Any]],
                        max_log2_ratio: int = 2) -> dict[str, Any]:
    """A stored fingerprint of the same hardware whose measured links are within a factor of
    2**max_log2_ratio of these, else ``fingerprint`` itself: measurement jitter between runs
    (large on shared machines) must not make a run miss the plans of the previous one."""
    mine = _link_exponents(str(fingerprint.get("links", "")))
    if mine is None:
        return fingerprint
    for other in known:
        if {k: v for k, v in other.items() if k != "links"} != {k: v for k, v in fingerprint.items() if k != "links"}:
            continue
        theirs = _link_exponents(str(other.get("links", "")))
        if theirs is None or theirs[0] != mine[0] or theirs[1].keys() != mine[1].keys():
            continue
        if all(abs(theirs[1][k] - mine[1][k]) <= max_log2_ratio for k in mine[1]):
            return dict(other)
    return fingerprint


def fingerprint_key(fingerprint: Fingerprint) -> str:
    if isinstance(fingerprint, str):
        return fingerprint
    return "|".join(f"{k}={fingerprint[k]}" for k in sorted(fingerprint))


def cache_key(fingerprint: Fingerprint, signature: LayerSignature, tokens: int) -> str:
    """Precompute `fingerprint_key(fp)` once and pass the string: the key then costs ~1 us."""
    return f"{fingerprint_key(fingerprint)}#{signature.key()}#T{token_bucket(tokens)}"


@dataclass(frozen=True)
class CacheEntry:
    plan: Plan
    predicted_ms: float | None
    measured_ms: float | None
    source: str                      # 'model' (predicted only) or 'measured' (timed in warmup)
    created: float                   # time.time() when stored
    fingerprint: dict = field(default_factory=dict)
    signature: dict = field(default_factory=dict)
    token_bucket: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "predicted_ms": self.predicted_ms,
                "measured_ms": self.measured_ms, "source": self.source, "created": self.created,
                "fingerprint": self.fingerprint, "signature": self.signature,
                "token_bucket": self.token_bucket}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheEntry:
        if data["source"] not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {data['source']!r}")
        predicted, measured = data.get("predicted_ms"), data.get("measured_ms")
        return cls(plan=Plan.from_dict(data["plan"]),
                   predicted_ms=None if predicted is None else float(predicted),
                   measured_ms=None if measured is None else float(measured),
                   source=str(data["source"]), created=float(data["created"]),
                   fingerprint=dict(data.get("fingerprint") or {}),
                   signature=dict(data.get("signature") or {}),
                   token_bucket=int(data.get("token_bucket", 0)))


def _parse(raw: bytes) -> tuple[dict[str, CacheEntry], str | None, int]:
    """(entries, what is wrong with the file or None, entries skipped as malformed)."""
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:   # msgpack raises several types for truncated or garbage input
        return {}, f"not a readable msgpack file ({type(exc).__name__}: {exc})", 0
    if not isinstance(data, dict):
        return {}, f"top level is a {type(data).__name__}, not a map", 0
    if data.get("schema") != SCHEMA_VERSION:
        return {}, f"schema {data.get('schema')!r}, this planner reads {SCHEMA_VERSION}", 0
    if not isinstance(data.get("entries"), dict):
        return {}, "'entries' is missing or not a map", 0
    entries, skipped = {}, 0
    for key, value in data["entries"].items():
        try:
            entries[str(key)] = CacheEntry.from_dict(value)
        except (KeyError, TypeError, ValueError, AttributeError):
            skipped += 1
    return entries, None, skipped


class PlanCache:
    """Chosen plans on disk, read once into a dict; `get` is a dict lookup after the first call."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_cache_path()
        self._entries: dict[str, CacheEntry] | None = None    # loaded lazily
        self._pending: dict[str, CacheEntry] = {}               # put, not yet on disk
        self._warned_unwritable = False

    # -- reading ------------------------------------------------------------------------------
    def get(self, fingerprint: Fingerprint, signature: LayerSignature,
            tokens: int) -> CacheEntry | None:
        return self.get_by_key(cache_key(fingerprint, signature, tokens))

    def get_by_key(self, key: str) -> CacheEntry | None:
        entries = self._entries if self._entries is not None else self._load()
        return entries.get(key)

    def entries(self) -> dict[str, CacheEntry]:
        return dict(self._entries if self._entries is not None else self._load())

    def reload(self) -> None:
        """Pick up other processes' writes (entries put here and not yet on disk stay)."""
        self._entries = None
        self._load()

    def _read_file(self) -> tuple[dict[str, CacheEntry], str | None]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}, None
        except OSError as exc:      # unreadable: nothing to move aside, work in memory
            self._warn_unwritable(exc)
            return {}, None
        entries, problem, skipped = _parse(raw)
        if skipped:
            warnings.warn(f"plan cache {self.path}: skipped {skipped} malformed entries",
                          RuntimeWarning, stacklevel=4)
        return entries, problem

    def _load(self) -> dict[str, CacheEntry]:
        entries, problem = self._read_file()
        if problem is not None:
            entries = self._recover(problem)
        entries.update(self._pending)
        self._entries = entries
        return entries

    def _recover(self, problem: str) -> dict[str, CacheEntry]:
        """Under the lock, re-check (another process may have rewritten it) and move it aside."""
        try:
            with self._locked():
                entries, problem_now = self._read_file()
                if problem_now is None:
                    return entries
                self._set_aside(problem_now)
        except OSError as exc:
            warnings.warn(f"plan cache {self.path}: {problem}; cannot move it aside ({exc}); "
                          f"starting with an empty in-memory cache", RuntimeWarning, stacklevel=4)
        return {}

    def _set_aside(self, problem: str) -> None:
        bad = self.path.with_name(f"{self.path.name}.bad-{time.time_ns()}")
        try:
            os.replace(self.path, bad)
            where = f"moved it aside to {bad}"
        except OSError as exc:
            where = f"could not move it aside ({exc})"
        warnings.warn(f"plan cache {self.path}: {problem}; {where}; starting empty",
                      RuntimeWarning, stacklevel=5)

    # -- writing ------------------------------------------------------------------------------
    def put(self, fingerprint: Fingerprint, signature: LayerSignature, tokens: int, plan: Plan,
            predicted_ms: float | None, measured_ms: float | None = None,
            source: str | None = None) -> CacheEntry:
        """Store a plan (source defaults to 'measured' when measured_ms is given) and persist."""
        source = source or ("measured" if measured_ms is not None else "model")
        fp = fingerprint if isinstance(fingerprint, dict) else {"key": fingerprint}
        entry = CacheEntry(plan=plan, predicted_ms=predicted_ms, measured_ms=measured_ms,
                           source=source, created=time.time(), fingerprint=dict(fp),
                           signature=signature.to_dict(), token_bucket=token_bucket(tokens))
        CacheEntry.from_dict(entry.to_dict())      # reject a bad source before it is stored
        key = cache_key(fingerprint, signature, tokens)
        if self._entries is None:
            self._load()
        self._pending[key] = entry
        self._entries[key] = entry
        self._flush()
        return entry

    def clear(self) -> int:
        """Drop every entry, on disk too; returns how many there were."""
        count = len(self.entries())
        self._pending.clear()
        self._entries = {}
        try:
            with self._locked():
                self._write({})
        except OSError as exc:
            self._warn_unwritable(exc)
        return count

    def _flush(self) -> None:
        try:
            with self._locked():
                on_disk, problem = self._read_file()
                if problem is not None:
                    self._set_aside(problem)
                on_disk.update(self._pending)
                self._write(on_disk)
        except OSError as exc:
            self._warn_unwritable(exc)
            return
        self._pending.clear()
        self._entries = on_disk

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive advisory lock on `<path>.lock` (the data file itself is replaced, not locked)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _write(self, entries: dict[str, CacheEntry]) -> None:
        payload = msgpack.packb({"schema": SCHEMA_VERSION,
                                 "entries": {k: e.to_dict() for k, e in entries.items()}},
                                use_bin_type=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _warn_unwritable(self, exc: OSError) -> None:
        if not self._warned_unwritable:
            self._warned_unwritable = True
            warnings.warn(f"plan cache {self.path} is not writable ({exc}); keeping plans in "
                          f"memory for this process", RuntimeWarning, stacklevel=4)
