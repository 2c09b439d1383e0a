"""Ingestion: data-space objects -> a committed, immutable lake snapshot (DataSnapshot).

Order of work, so that nothing is read that the policy does not allow, nothing is read
twice, and readers never see a partial snapshot:

1. **Policy**, before any listing or read: the dataset's usage policy is evaluated for
   the start-up and purpose (tasks/data/policy.py); a refusal names the rule.
2. **Listing** (key, ETag or version id, size): the snapshot id is derived from it, the
   dataset's contract, the policy's pseudonymisation (columns, key fingerprint), the
   start-up and the purpose. If that snapshot is already committed it is returned as it
   is: a listing and one metadata request, no data byte read.
3. **Objects**: each listed object has a content address (its identity, the contract and
   the pseudonymisation). An object already in the lake under that address is reused
   without being read; only new or changed objects are read, streamed batch by batch,
   checked and normalised to the contract (tasks/data/formats.py), pseudonymised, and written
   to ``<lake>/objects/<dataset>/<address>.parquet`` (staged, then one rename or one
   single-request PUT: no partial file and no multipart upload can be left behind), then
   its record (``.json``, written last: the object's commit point). An object that
   changes while it is read is refused.
4. **Primary keys** are checked for duplicates within each object and across objects:
   64-bit key hashes, spread over hash buckets on local disk (memory does not grow with
   the dataset), and every hash match confirmed on the values before it is reported.
5. **Strict** (default): any bad object fails the snapshot with one error line (capped:
   the first few bad objects, each with its first few problems, i.e. column, expected and
   actual, and counts of the rest). When the line leaves problems out, every one is
   written to a local JSON report that the line names (:class:`ContractError` carries
   them too). **Quarantine**: good objects are committed and bad ones listed, with every
   problem, in ``quarantine.json`` and the manifest.
6. ``<lake>/snapshots/<dataset>/<id>/manifest.json`` is written last: the commit point.

Lake object files are content-addressed and never overwritten, so committed snapshots are
immutable even though snapshots share unchanged objects.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aifactory.tasks.core.errors import AifError, DataError, StorageError
from aifactory.tasks.core.manifests import DataSnapshot, ObjectRecord, QuarantineRecord
from aifactory.tasks.core.provenance import now_iso
from aifactory.tasks.data.catalog import EXTENSIONS, DatasetEntry, catalog_at
from aifactory.tasks.data.dataspace import (
    DatasetContract,
    SourceObject,
    check_store,
    filesystem,
    is_connection_error,
    list_objects,
    options_of,
    stat_object,
    storage_error,
)
from aifactory.tasks.data.formats import (
    READERS,
    SHOWN_PROBLEMS,
    ObjectBad,
    Problem,
    capped,
    short,
)
from aifactory.tasks.data.policy import (
    Decision,
    PolicyError,
    enforce,
    evaluate,
    key_fingerprint,
    pseudonymise_batch,
)
from aifactory.tasks.data.progress import Tracker
from aifactory.tasks.doors.lake import (
    atomic_write_bytes,
    exists,
    is_staging,
    read_json,
    remove_quietly,
    sha256_file,
    staged_file,
    write_json_atomic,
)

LAKE_FORMAT = "aif-lake-v2"  # bump when the lake bytes for the same input would change
# Lake row groups: batches are gathered up to this many rows (bounded memory per worker).
ROW_GROUP_ROWS = 524_288
# Fixed writer options: the same source bytes give the same lake bytes (and lake_sha256).
LAKE_WRITER: dict[str, Any] = {
    "compression": "zstd",
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
}
PK_BUCKETS = 64
# An error line shows this many bad objects at most (each: its first few problems), and is
# about this long at most; the rest are counted, and all are in a report file.
SHOWN_OBJECTS, ERROR_CHARS = 5, 2000

Progress = Callable[[str], None]


@dataclass
class IngestOptions:
    """How to ingest: who and why (the policy), pseudonymisation key, strictness."""

    startup: str
    purpose: str = "unspecified"
    declared_purposes: list[str] | None = None  # the start-up's declared purposes
    pseudonymisation_key: bytes | None = None
    quarantine: bool = False
    workers: int = 2
    today: dt.date | None = None
    entry: DatasetEntry | None = None  # default: the shipped catalog's entry
    on_decision: Callable[[Decision], None] | None = None
    # Where a refused ingest writes every problem when its error line cannot hold them
    # (default: <temp dir>/aif-ingest-<uid>/); the line names the file.
    report_dir: str | None = None


@dataclass
class _Outcome:
    obj: SourceObject
    record: ObjectRecord | None = None
    problems: list[Problem] = field(default_factory=list)
    read: bool = False
    pk_local: str | None = None  # local file of the object's key hashes (this run's reads)


def snapshot_id(
    dataset: str,
    objs: list[SourceObject],
    dc: DatasetContract | None = None,
    salt: str = "",
) -> str:
    """First 16 hex of sha256 over the dataset, its contract, ``salt`` (start-up, purpose,
    pseudonymisation) and the sorted object identities (key, ETag or version, size)."""
    h = hashlib.sha256(dataset.encode())
    if dc is not None:
        h.update(f"\ncontract:{dc.fingerprint()}".encode())
    if salt:
        h.update(f"\n{salt}".encode())
    for o in sorted(objs, key=lambda o: o.key):
        h.update(f"\n{o.key}|{o.identity()}|{o.size}".encode())
    return h.hexdigest()[:16]


def object_address(o: SourceObject, dc: DatasetContract, pseudo: str) -> str:
    blob = f"{LAKE_FORMAT}|{dc.name}|{dc.fingerprint()}|{pseudo}|{o.key}|{o.identity()}|{o.size}"
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(value: str, what: str) -> str:
    """A dataset id or snapshot id as a single path segment: never ``..``, ``/`` or empty
    (a name that climbs would read another start-up's part of the lake)."""
    if not _NAME.fullmatch(value or "") or ".." in value:
        raise DataError(f"{what} {value!r}: not a valid name (letters, digits, '.', '_', '-'; "
                        "one path segment)")  # fmt: skip
    return value


def snapshot_url(lake_url: str, dataset: str, sid: str) -> str:
    check_name(dataset, "dataset")
    check_name(sid, "snapshot")
    return f"{lake_url.rstrip('/')}/snapshots/{dataset}/{sid}"


def objects_url(lake_url: str, dataset: str) -> str:
    return f"{lake_url.rstrip('/')}/objects/{dataset}"


# -- primary keys -----------------------------------------------------------------------
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
LONG_KEY_WORDS = 32  # text keys over 32 words (256 bytes) are hashed by BLAKE2b
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def key_hashes(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of a key column's values, computed in numpy on Arrow's buffers (no
    Python object per value). Integers and timestamps are mixed directly; text is padded to
    whole 8-byte words of its own (keys of one word count at a time: one reshape when all
    keys have the same length, as IDs usually do) and folded word by word with its length;
    text over 256 bytes gets an 8-byte BLAKE2b digest instead. A value's hash depends on
    the value only, never on the other keys of its batch (nor on how the object is cut).

    Equal hashes are only candidates: every duplicate is confirmed on the values themselves
    before it is reported, so a hash collision can never refuse good data.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_temporal(t):
        v = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        return _mix(v.view(np.uint64) ^ _GOLDEN)
    if not pa.types.is_large_string(t):
        arr = arr.cast(pa.large_string())
    n = len(arr)
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offs)
    if n and (lengths == lengths[0]).all() and lengths[0] <= 8 * LONG_KEY_WORDS:  # usual
        size = int(lengths[0])
        width = max(8, -(-size // 8) * 8)
        mat = np.zeros((n, width), dtype=np.uint8)
        mat[:, :size] = data[offs[0] : offs[-1]].reshape(n, size)
        return _fold(mat.view("<u8"), lengths)
    h = np.empty(n, dtype=np.uint64)
    nwords = np.maximum(1, -(-lengths // 8))
    for w in np.unique(nwords):
        rows = np.flatnonzero(nwords == w)
        if w > LONG_KEY_WORDS:  # long text: one digest per value, not a fold per word
            for r in rows:
                digest = hashlib.blake2b(data[offs[r] : offs[r + 1]].tobytes(), digest_size=8)
                h[r] = int.from_bytes(digest.digest(), "little")
            continue
        sizes = lengths[rows]
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        flat = np.zeros(len(rows) * int(w) * 8, dtype=np.uint8)
        flat[np.repeat(np.arange(len(rows)) * int(w) * 8, sizes) + within] = data[
            np.repeat(offs[rows], sizes) + within
        ]
        h[rows] = _fold(flat.view("<u8").reshape(len(rows), int(w)), sizes)
    return h


def _fold(words: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    h = _mix(lengths.astype(np.uint64) + _GOLDEN)
    for j in range(words.shape[1]):
        h = _mix(h ^ words[:, j])
    return h


def _exact_duplicates(values: pa.Array | pa.ChunkedArray) -> tuple[int, list[str]]:
    """(number of repeated values, a few examples) of one column, exactly."""
    import pandas as pd

    s = pd.Series(values.to_pandas())
    dup = s[s.duplicated()]
    return len(dup), [str(v) for v in dup.drop_duplicates().head(3)]


_SHIFT = np.uint64(64 - int(np.log2(PK_BUCKETS)))
HASH_CHUNK = 1 << 20  # hashes read from a local hash file at a time (8 MiB)


def _bucket_slices(sorted_h: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(bucket, start, end) of each non-empty bucket of sorted hashes (by their top bits)."""
    bounds = np.searchsorted(sorted_h >> _SHIFT, np.arange(PK_BUCKETS + 1, dtype=np.uint64))
    for b in range(PK_BUCKETS):
        if bounds[b + 1] > bounds[b]:
            yield b, int(bounds[b]), int(bounds[b + 1])


def _hash_file_chunks(path: str) -> Iterator[np.ndarray]:
    with open(path, "rb") as fh:
        while True:
            h = np.fromfile(fh, dtype="<u8", count=HASH_CHUNK)
            if not len(h):
                return
            yield h


Hashes = np.ndarray | Iterable[np.ndarray]  # all at once, or in chunks


def duplicates_across(loaders: list[Callable[[], Hashes]]) -> dict[int, dict[int, set[int]]]:
    """Key hashes shared between objects: {later object: {earlier object: {hashes}}}.

    Each loader gives one object's hashes, at once or in chunks. They are spread over
    PK_BUCKETS files on local disk by their top bits and each bucket is checked alone, so
    memory holds one chunk or one bucket at a time.
    """
    rec_dtype = np.dtype([("h", "<u8"), ("o", "<u4")])
    found: dict[int, dict[int, set[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="aif-pk-") as tmp:
        paths = [os.path.join(tmp, f"b{i:02d}") for i in range(PK_BUCKETS)]
        for idx, load in enumerate(loaders):
            got = load()
            for h in [got] if isinstance(got, np.ndarray) else got:
                h = np.sort(h)
                rec = np.empty(len(h), dtype=rec_dtype)
                rec["h"], rec["o"] = h, idx
                for b, lo, hi in _bucket_slices(h):
                    with open(paths[b], "ab") as fh:
                        fh.write(rec[lo:hi].tobytes())
        for p in paths:
            if not os.path.exists(p):
                continue
            a = np.fromfile(p, dtype=rec_dtype)
            hs = np.sort(a["h"])
            if not (hs[1:] == hs[:-1]).any():  # the usual case: no shared hash at all
                continue
            a = a[np.argsort(a["h"], kind="stable")]  # stable: objects stay in order
            same = a["h"][1:] == a["h"][:-1]
            if not same.any():
                continue
            starts = np.flatnonzero(np.concatenate([[True], ~same]))
            first = np.repeat(starts, np.diff(np.concatenate([starts, [len(a)]])))
            for j in np.flatnonzero(same) + 1:
                o_first, o_this = int(a["o"][first[j]]), int(a["o"][j])
                if o_this != o_first:
                    found.setdefault(o_this, {}).setdefault(o_first, set()).add(int(a["h"][j]))
    return found


class _HashSpill:
    """One object's key hashes, batch by batch: held in memory up to HASH_CHUNK of them,
    beyond that spread over PK_BUCKETS local files by their top bits. ``finish`` writes them
    sorted to one file, bucket by bucket. Memory holds HASH_CHUNK hashes or one bucket's,
    never the object's."""

    def __init__(self) -> None:
        self.held: list[np.ndarray] = []
        self.count = 0
        self.dir: str | None = None

    def _path(self, b: int) -> str:
        assert self.dir is not None
        return os.path.join(self.dir, f"b{b:02d}")

    def add(self, h: np.ndarray) -> None:
        self.held.append(h)
        self.count += len(h)
        if self.count >= HASH_CHUNK:
            self._spill()

    def _spill(self) -> None:
        if not self.held:
            return
        h = np.sort(np.concatenate(self.held))
        self.held, self.count = [], 0
        if self.dir is None:
            self.dir = tempfile.mkdtemp(prefix="aif-pk-")
        for b, lo, hi in _bucket_slices(h):
            with open(self._path(b), "ab") as fh:
                fh.write(h[lo:hi].tobytes())

    def finish(self, dest: str) -> bool:
        """Write every hash, sorted, to ``dest``; True if any hash occurs twice."""
        if self.dir is None:  # all in memory: a small object
            h = np.sort(np.concatenate(self.held)) if self.held else np.zeros(0, "<u8")
            h.tofile(dest)
            return bool((h[1:] == h[:-1]).any())
        self._spill()
        repeated = False
        with open(dest, "wb") as out:
            for b in range(PK_BUCKETS):
                if os.path.exists(self._path(b)):
                    h = np.sort(np.fromfile(self._path(b), dtype="<u8"))
                    repeated = repeated or bool((h[1:] == h[:-1]).any())
                    out.write(h.tobytes())
        return repeated

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


# -- one object ---------------------------------------------------------------------------
class _Reader:
    """Streams one source object into a staged lake file; ``advance(n)`` is told of each
    ``n`` bytes of the object read so far (the file's position after each batch)."""

    def __init__(self, fs: Any, obj: SourceObject, dc: DatasetContract, personal: list[str],
                 key: bytes | None,
                 advance: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.fs, self.obj, self.dc, self.personal, self.key = fs, obj, dc, personal, key
        self.advance = advance
        self.reported = 0  # bytes of the object told to ``advance``

    def _read_up_to(self, fh: Any) -> None:
        if self.advance is None:
            return
        try:
            pos = min(int(fh.tell()), self.obj.size)
        except Exception:  # a position is only for the progress bar
            return
        if pos > self.reported:
            self.advance(pos - self.reported)
            self.reported = pos

    def copy(self, local_parquet: str, local_pk: str) -> int:
        spill = _HashSpill()
        try:
            return self._copy(local_parquet, local_pk, spill)
        finally:
            spill.close()

    def _copy(self, local_parquet: str, local_pk: str, hashes: _HashSpill) -> int:
        reader = READERS[self.dc.format]
        rows = 0
        try:
            fh = self.fs.open(self.obj.key, "rb")
        except FileNotFoundError:
            raise ObjectBad([Problem("vanished after it was listed")]) from None
        pending: list[pa.RecordBatch] = []
        batches = reader(fh, self.dc.schema)
        with (
            fh,
            contextlib.closing(batches),  # a reader's read-ahead stops before fh closes
            pq.ParquetWriter(local_parquet, self.dc.schema, **LAKE_WRITER) as writer,
        ):

            def flush() -> None:
                if pending:
                    writer.write_table(
                        pa.Table.from_batches(pending), row_group_size=ROW_GROUP_ROWS
                    )
                    pending.clear()

            for batch in batches:
                if self.personal:
                    assert self.key is not None
                    batch = pseudonymise_batch(batch, self.personal, self.key)
                hashes.add(key_hashes(batch.column(self.dc.primary_key)))
                pending.append(batch)
                rows += batch.num_rows
                self._read_up_to(fh)
                if sum(b.num_rows for b in pending) >= ROW_GROUP_ROWS:
                    flush()
            flush()
        if rows == 0:
            raise ObjectBad([Problem("holds no rows (an empty or header-only export?)")])
        if hashes.finish(local_pk):  # candidates: confirm on the values
            n, examples = _exact_duplicates(
                pq.read_table(local_parquet, columns=[self.dc.primary_key]).column(0)
            )
            if n:
                shown = ", ".join(repr(e) for e in examples)
                raise ObjectBad([Problem(f"{n} duplicate value(s) within the object, e.g. {shown}",
                                         self.dc.primary_key, "unique (primary key)",
                                         "duplicates")])  # fmt: skip
        return rows


def _changed(before: SourceObject, now: SourceObject | None) -> str | None:
    if now is None:
        return "vanished while being read"
    if now.identity() != before.identity() or now.size != before.size:
        return (
            f"changed while being read (listed as {before.identity()}, {before.size} bytes; "
            f"now {now.identity()}, {now.size} bytes)"
        )
    return None


def _ingest_object(
    o: SourceObject, address: str, src_fs: Any, lake_fs: Any, objects_root: str,
    objects_root_url: str, dc: DatasetContract, personal: list[str], key: bytes | None,
    decision: str, storage_options_lake: dict[str, Any] | None, tracker: Tracker | None = None,
) -> _Outcome:  # fmt: skip
    out = _Outcome(obj=o, read=True)
    reader = _Reader(src_fs, o, dc, personal, key, tracker.advance if tracker else None)
    base = f"{objects_root}/{address}"
    fd, local_pk = tempfile.mkstemp(prefix="aif-pk-", suffix=".bin")
    os.close(fd)
    committed: list[str] = []
    try:
        with staged_file(lake_fs, f"{base}.parquet") as local:
            try:
                rows = reader.copy(local, local_pk)
            except ObjectBad:
                raise
            except Exception as exc:
                if type(exc).__name__ == "FileExpired":
                    raise ObjectBad(
                        [Problem("changed while being read (its ETag changed)")]
                    ) from None
                if is_connection_error(exc) or isinstance(exc, PermissionError):
                    raise storage_error(
                        f"data space object {o.url}", exc, options_of(src_fs)
                    ) from None
                raise ObjectBad([Problem(f"cannot be read ({short(exc)})")]) from None
            why = _changed(o, stat_object(src_fs, o))
            if why:
                raise ObjectBad([Problem(why)])
            digest = sha256_file(local)
        committed.append(f"{base}.parquet")
        out.record = ObjectRecord(
            key=o.key, etag=o.etag, version_id=o.version_id, identity=o.identity(),
            size=o.size, rows=rows,
            lake_path=f"{objects_root_url}/{address}.parquet", lake_sha256=digest,
            format=dc.format, address=address, decision=decision, pseudonymised=personal,
        )  # fmt: skip
        write_json_atomic(lake_fs, f"{base}.json", out.record.model_dump(mode="json"))
        out.pk_local = local_pk
        local_pk = ""
    except ObjectBad as bad:
        remove_quietly(lake_fs, committed)
        out.problems = bad.problems
    except AifError:
        remove_quietly(lake_fs, committed)
        raise
    except Exception as exc:
        remove_quietly(lake_fs, committed)
        raise storage_error(
            f"lake {objects_root_url}/{address}", exc, storage_options_lake
        ) from None
    finally:
        if local_pk:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local_pk)
        if tracker is not None:  # the object is done with, read whole or not
            tracker.advance(o.size - reader.reported)
    return out


def _bad_line(o: SourceObject, problems: list[Problem]) -> str:
    return f"object {o.url}: " + capped(problems)


def _bad_objects(lines: list[str]) -> str:
    return capped(lines, " | ", SHOWN_OBJECTS, ERROR_CHARS, noun="object")


class ContractError(DataError):
    """Objects break the contract. The line shows the first few objects and problems of
    each; ``problems`` has every one ({object URL: [problem dicts]}), and ``report`` is
    the local JSON file that holds them when the line leaves some out (None if not)."""

    def __init__(self, message: str, problems: dict[str, list[dict[str, Any]]],
                 report: str | None) -> None:  # fmt: skip
        super().__init__(message)
        self.problems = problems
        self.report = report


def _contract_error(head: str, bad: list[_Outcome], dataset: str, sid: str,
                    report_dir: str | None) -> ContractError:  # fmt: skip
    """``head`` and the bad objects in one capped line; every problem in a local report
    file (named in the line) when the line cannot hold them all."""
    problems = {b.obj.url: [p.as_dict() for p in b.problems] for b in bad}
    line = head + _bad_objects([_bad_line(b.obj, b.problems) for b in bad])
    complete = len(bad) <= SHOWN_OBJECTS and all(
        len(b.problems) <= SHOWN_PROBLEMS for b in bad
    ) and "…" not in line  # fmt: skip
    report = None if complete else _write_report(report_dir, dataset, sid, problems)
    if report:
        n = sum(len(v) for v in problems.values())
        line += f" (all {n} problems of {len(bad)} object(s): {report})"
    return ContractError(line, problems, report)


def _write_report(report_dir: str | None, dataset: str, sid: str,
                  problems: dict[str, list[dict[str, Any]]]) -> str | None:  # fmt: skip
    """Write every problem to ``<report_dir>/<dataset>-<snapshot id>-problems.json`` (whole
    or not at all); its path, or None if it could not be written."""
    folder = report_dir or os.path.join(tempfile.gettempdir(), f"aif-ingest-{os.getuid()}")
    path = os.path.join(folder, f"{dataset}-{sid}-problems.json")
    data = {"dataset": dataset, "snapshot_id": sid, "created_at": now_iso(),
            "objects": [{"url": u, "problems": ps} for u, ps in problems.items()]}  # fmt: skip
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return None
    return path


# -- the snapshot ----------------------------------------------------------------------
def ingest(
    source_url: str,
    lake_url: str,
    dataset: str,
    storage_options_source: dict[str, Any] | None,
    storage_options_lake: dict[str, Any] | None,
    startup: str | IngestOptions,
    progress: Progress | None = None,
) -> DataSnapshot:
    """Snapshot ``dataset`` at ``source_url`` into the lake; return its committed manifest.

    ``startup`` is a start-up id (defaults for everything else) or full IngestOptions.
    Raises PolicyError (refused), DataError (bad objects, strict), StorageError.
    """
    opts = startup if isinstance(startup, IngestOptions) else IngestOptions(startup=startup)
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    entry = opts.entry or catalog_at().get(dataset)
    dc: DatasetContract = entry.contract()

    decision = evaluate(entry, opts.startup, opts.purpose, opts.declared_purposes, opts.today)
    if opts.on_decision:
        opts.on_decision(decision)
    enforce(decision)
    say(decision.line())
    personal = list(entry.policy.personal_data)
    pseudo = "none"
    if personal:
        if not opts.pseudonymisation_key:
            raise PolicyError(
                f"ingest {dataset}: personal-data columns {', '.join(personal)} must be "
                "pseudonymised, and no pseudonymisation key is configured"
            )
        pseudo = f"hmac-sha256:{key_fingerprint(opts.pseudonymisation_key)}:{','.join(personal)}"

    objs = list_objects(source_url, storage_options_source, "data space",
                        extension=EXTENSIONS[dc.format])  # fmt: skip
    salt = f"startup:{opts.startup}|purpose:{opts.purpose}|pseudo:{pseudo}"
    sid = snapshot_id(dataset, objs, dc, salt)
    root_url = snapshot_url(lake_url, dataset, sid)
    lake_fs, _ = check_store(lake_url, storage_options_lake, "lake")
    _, root = filesystem(root_url, storage_options_lake)
    manifest_path = f"{root}/manifest.json"
    try:
        committed = exists(lake_fs, manifest_path)
    except Exception as exc:
        raise storage_error(f"lake {lake_url}", exc, storage_options_lake) from None
    if committed:
        snap = load_snapshot(lake_url, dataset, sid, storage_options_lake)
        if snap.quarantined and not opts.quarantine:
            raise DataError(
                f"ingest {dataset}: snapshot {sid} of this listing has "
                f"{len(snap.quarantined)} quarantined object(s) (strict mode refuses it; every "
                f"problem in {root_url}/quarantine.json): "
                + _bad_objects([f"object {q.key}: {q.reason}" for q in snap.quarantined])
            )
        say(f"snapshot {sid} is already committed: nothing changed, no object read")
        return snap.model_copy(
            update={
                "reused": True,
                "bytes_read": 0,
                "objects_read": [],
                "policy": decision.as_dict(),
            }
        )

    obj_root_url = objects_url(lake_url, dataset)
    _, obj_root = filesystem(obj_root_url, storage_options_lake)
    src_fs, _ = filesystem(source_url.split("*")[0], storage_options_source)
    addresses = {o.key: object_address(o, dc, pseudo) for o in objs}
    outcomes: dict[str, _Outcome] = {}
    to_read: list[SourceObject] = []
    try:  # one listing of the lake's objects, not one request per object
        committed_objs = _listed_names(lake_fs, obj_root)
    except Exception as exc:
        raise storage_error(f"lake {obj_root_url}", exc, storage_options_lake) from None
    for o in objs:
        rec_path = f"{obj_root}/{addresses[o.key]}.json"
        try:
            known = f"{addresses[o.key]}.json" in committed_objs
            data = read_json(lake_fs, rec_path) if known else None
        except Exception as exc:
            raise storage_error(f"lake {obj_root_url}", exc, storage_options_lake) from None
        if data is not None:
            outcomes[o.key] = _Outcome(obj=o, record=ObjectRecord.model_validate(data))
        else:
            to_read.append(o)
    reused = len(objs) - len(to_read)
    total_bytes = sum(o.size for o in to_read)
    say(
        f"{len(objs)} objects listed: {reused} unchanged (reused, not read), "
        f"{len(to_read)} to read ({total_bytes / 1e6:.1f} MB): snapshot {sid}"
    )

    done_lock = threading.Lock()
    done = [0, 0]  # objects, bytes
    t_read = time.monotonic()
    # The terminal's progress bar (tasks/data/progress.py): bytes of the objects to read.
    tracker = Tracker("ingest", total_bytes, "B") if to_read else None

    def work(o: SourceObject) -> _Outcome:
        res = _ingest_object(
            o, addresses[o.key], src_fs, lake_fs, obj_root, obj_root_url, dc, personal,
            opts.pseudonymisation_key, decision.rule, storage_options_lake, tracker,
        )  # fmt: skip
        with done_lock:
            # Recorded at once, not when the pool's results are read: if another object
            # fails first, this one's local key-hash file is still removed at the end.
            outcomes[o.key] = res
            done[0] += 1
            done[1] += o.size
            rate = done[1] / 1e6 / max(time.monotonic() - t_read, 1e-6)
            status = "bad" if res.problems else f"{res.record.rows if res.record else 0} rows"
            say(f"[{done[0]}/{len(to_read)}] {o.key.rsplit('/', 1)[-1]}: {status} "
                f"({done[1] / 1e6:.1f}/{total_bytes / 1e6:.1f} MB, {rate:.1f} MB/s)")  # fmt: skip
        return res

    try:
        workers = max(1, min(opts.workers, len(to_read)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aif-ingest") as pool:
            results = pool.map(work, to_read) if workers > 1 else map(work, to_read)
            for res in results:
                outcomes[res.obj.key] = res
        ordered = [outcomes[o.key] for o in objs]
        good = [r for r in ordered if r.record is not None]
        _check_across(good, lake_fs, dc, say)
        bad = [r for r in ordered if r.problems]
        if bad and not opts.quarantine:
            head = f"ingest {dataset}: " + (
                f"{len(bad)} of {len(objs)} objects break the contract: " if len(bad) > 1 else ""
            )
            raise _contract_error(head, bad, dataset, sid, opts.report_dir)
        good = [r for r in ordered if r.record is not None and not r.problems]
        if not good:
            raise _contract_error(f"ingest {dataset}: every object is bad; nothing to commit: ",
                                  bad, dataset, sid, opts.report_dir)  # fmt: skip
        records = [r.record for r in good if r.record is not None]
        quarantined = [
            QuarantineRecord(
                key=b.obj.key,
                etag=b.obj.etag,
                size=b.obj.size,
                reason=capped(b.problems),
                problems=[p.as_dict() for p in b.problems],
            )
            for b in bad
        ]
        read = [r for r in ordered if r.read]
        snap = DataSnapshot(
            snapshot_id=sid,
            dataset=dataset,
            data_space=entry.data_space,
            title=entry.title,
            publisher=entry.publisher,
            license=entry.license,
            format=dc.format,
            source_url=source_url,
            lake_url=root_url,
            schema_fields=dc.schema_fields(),
            primary_key=dc.primary_key,
            contract_fingerprint=dc.fingerprint(),
            objects=records,
            rows=sum(r.rows for r in records),
            bytes=sum(r.size for r in records),
            startup=opts.startup,
            purpose=opts.purpose,
            policy=decision.as_dict(),
            pseudonymisation=pseudo,
            quarantined=quarantined,
            objects_read=[r.obj.key for r in read],
            bytes_read=sum(r.obj.size for r in read),
            created_at=now_iso(),
            duration_s=round(time.monotonic() - t0, 3),
        )
        try:
            if quarantined:
                write_json_atomic(
                    lake_fs, f"{root}/quarantine.json",
                    {"snapshot_id": sid, "dataset": dataset,
                     "objects": [q.model_dump(mode="json") for q in quarantined]},
                )  # fmt: skip
            write_json_atomic(lake_fs, manifest_path, snap.model_dump(mode="json"))
        except Exception as exc:
            raise storage_error(
                f"lake {root_url}/manifest.json", exc, storage_options_lake
            ) from None
    finally:
        for p in [r.pk_local for r in outcomes.values() if r.pk_local]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    if quarantined:
        say(f"quarantined {len(quarantined)} object(s) (every problem in {root_url}/"
            "quarantine.json): "
            + _bad_objects([f"{q.key}: {q.reason}" for q in quarantined]))  # fmt: skip
    say(f"snapshot {sid} committed: {snap.rows} rows in {len(records)} objects "
        f"({len(read)} read, {reused} reused)")  # fmt: skip
    return snap


def _listed_names(fs: Any, folder: str) -> set[str]:
    """Names of the files directly in ``folder`` (empty when it does not exist yet)."""
    with contextlib.suppress(Exception):
        fs.invalidate_cache(folder)
    try:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
        return {n for n in names if not is_staging(n)}
    except FileNotFoundError:
        return set()


def _check_across(good: list[_Outcome], lake_fs: Any, dc: DatasetContract,
                  say: Progress) -> None:  # fmt: skip
    """Mark objects whose primary keys repeat keys of an earlier object as bad.

    Key hashes of objects read by this run come from local files; those of reused objects
    from their lake file's key column. Hash matches are confirmed on the values."""
    if len(good) < 2:
        return
    pk = dc.primary_key

    def keys_of(r: _Outcome) -> pa.ChunkedArray:
        assert r.record is not None
        with lake_fs.open(r.record.lake_path.split("://", 1)[-1], "rb") as fh:
            return pq.read_table(fh, columns=[pk]).column(0)

    def loader(r: _Outcome) -> Callable[[], Hashes]:
        def load() -> Iterator[np.ndarray]:
            if r.pk_local:  # read by this run: its hashes are on local disk
                yield from _hash_file_chunks(r.pk_local)
                return
            assert r.record is not None  # reused: hashed from its lake file, batch by batch
            with lake_fs.open(r.record.lake_path.split("://", 1)[-1], "rb") as fh:
                for batch in pq.ParquetFile(fh).iter_batches(columns=[pk]):
                    yield key_hashes(batch.column(0))

        return load

    found = duplicates_across([loader(r) for r in good])
    bad = 0
    for idx, others in sorted(found.items()):
        r = good[idx]
        mine = keys_of(r)
        mine_h = key_hashes(mine)
        details = []
        for o, hashes in sorted(others.items()):
            cand = np.fromiter(hashes, dtype="<u8")
            theirs = keys_of(good[o])
            a = set(pa.array(mine).filter(pa.array(np.isin(mine_h, cand))).to_pylist())
            b_keys = pa.array(theirs)
            b = set(b_keys.filter(pa.array(np.isin(key_hashes(b_keys), cand))).to_pylist())
            shared = sorted(a & b, key=str)
            if shared:
                eg = ", ".join(repr(v) for v in shared[:3])
                details.append(f"{len(shared)} shared with {good[o].obj.url} (e.g. {eg})")
        if details:
            bad += 1
            r.problems.append(
                Problem("primary-key values already in an earlier object: "
                        + capped(details, "; ", 3, 400, noun="object"),
                        pk, "unique (primary key)", "duplicates")
            )  # fmt: skip
    if bad:
        say(f"{bad} object(s) repeat primary keys of earlier objects")


def audit(lake_url: str, storage_options: dict[str, Any] | None, decision: Decision) -> str:
    """Append a policy decision to the lake's audit trail (one small JSON object each)."""
    fs, root = filesystem(lake_url, storage_options)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    name = f"{stamp}-{decision.startup}-{uuid.uuid4().hex[:8]}.json"
    path = f"{root}/audit/policy/{decision.dataset}/{name}"
    data = json.dumps({**decision.as_dict(), "recorded_at": now_iso()}, sort_keys=True)
    atomic_write_bytes(fs, path, data.encode() + b"\n")
    return path


def load_snapshot(
    lake_url: str, dataset: str, snapshot_id: str, storage_options: dict[str, Any] | None = None
) -> DataSnapshot:
    """The committed manifest of one snapshot; DataError if it was never committed."""
    url = snapshot_url(lake_url, dataset, snapshot_id)
    fs, root = filesystem(url, storage_options)
    path = f"{root}/manifest.json"
    try:
        if not exists(fs, path):
            raise DataError(
                f"snapshot {snapshot_id} of {dataset}: no committed manifest at {url}/manifest.json"
            )
        data = read_json(fs, path)
    except (DataError, StorageError):
        raise
    except Exception as exc:
        raise storage_error(f"lake {url}/manifest.json", exc, storage_options) from None
    try:
        return DataSnapshot.model_validate(data)
    except ValueError as exc:
        raise DataError(
            f"lake {url}/manifest.json: not a valid DataSnapshot ({short(exc)})"
        ) from None


def list_snapshots(
    lake_url: str, dataset: str, storage_options: dict[str, Any] | None = None
) -> list[DataSnapshot]:
    """Committed snapshots of ``dataset`` (folders without a manifest are skipped), oldest
    first."""
    url = f"{lake_url.rstrip('/')}/snapshots/{check_name(dataset, 'dataset')}"
    fs, root = check_store(lake_url, storage_options, "lake")
    _, root = filesystem(url, storage_options)
    try:
        if not exists(fs, root):
            return []
        entries = fs.ls(root, detail=False)
    except Exception as exc:
        raise storage_error(f"lake {url}", exc, storage_options) from None
    out = []
    for entry in sorted(entries):
        sid = entry.rstrip("/").rsplit("/", 1)[-1]
        if is_staging(sid):
            continue
        if exists(fs, f"{root}/{sid}/manifest.json"):
            with contextlib.suppress(DataError):
                out.append(load_snapshot(lake_url, dataset, sid, storage_options))
    return sorted(out, key=lambda s: (s.created_at, s.snapshot_id))


__all__ = ["IngestOptions", "PolicyError", "audit", "ingest", "list_snapshots", "load_snapshot"]
