"""Reading data-space objects (Parquet, CSV, JSON Lines) as batches of the contract's types.

Every object is streamed (Parquet by row group, CSV and JSON Lines by block of whole
lines), so memory does not grow with the object's size; checked and normalised to the
dataset contract's Arrow schema with safe casts only:

* same type; any integer to a wider or narrower integer and integer to float, checked
  value by value (an overflow or a lost digit is an error, not a silent change);
  float32 to float64; timestamps to another unit (no truncation allowed) or another time
  zone (the same instant); a column of nulls to any nullable type;
* refused at type level: string <-> number, float -> integer, bool <-> anything else,
  a naive timestamp where the contract has a zone (or the reverse), dates <-> timestamps.

CSV and JSON Lines are cut into blocks of whole lines here (a read of ``BLOCK_BYTES``, up
to its last line end: where Arrow's streaming readers cut them, so the batches are theirs)
and each block is parsed alone. At most two blocks are held (the one in use and the next,
read and parsed ahead in a worker thread), not the streaming readers' read-ahead of up to
32 blocks. A line longer than a block grows its block, up to ``MAX_LINE_BYTES``; a longer
line is refused with its number and length.

A problem is a :class:`Problem` naming the column, the expected and the actual; reading
stops at the object's first problem (:class:`ObjectBad`), whose one-line text shows the
first few problems and how many more there are (:func:`capped`); ``problems`` has all.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

T = TypeVar("T")
Batches = Generator[pa.RecordBatch, None, None]  # a reader's batches; close() stops it
BATCH_ROWS = 131_072
BLOCK_BYTES = 4 << 20  # CSV / JSON Lines block size
MAX_LINE_BYTES = 256 << 20  # the longest CSV / JSON Lines line read (its block grows to it)
SHOWN_PROBLEMS, LINE_CHARS = 5, 500  # an error line: the first few problems, this long at most


@dataclass(frozen=True)
class Problem:
    message: str
    column: str | None = None
    expected: str | None = None
    actual: str | None = None

    def __str__(self) -> str:
        if self.column is None:
            return self.message
        text = f"column {self.column!r}"
        if self.expected is not None or self.actual is not None:
            text += f": expected {self.expected}, actual {self.actual}"
        return f"{text} ({self.message})" if self.message else text

    def as_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "expected": self.expected,
            "actual": self.actual,
            "message": self.message,
        }


class ObjectBad(Exception):
    """An object breaks its contract; carries every problem found (the text: a few)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__(capped(problems))
        self.problems = problems


def capped(items: Sequence[object], sep: str = "; ", most: int = SHOWN_PROBLEMS,
           chars: int = LINE_CHARS, noun: str = "problem") -> str:  # fmt: skip
    """The first ``most`` items joined by ``sep``, then "... and N more problems": at most
    about ``chars`` characters (fewer items are shown if they would not fit; a lone long one
    is cut), so that thousands of problems still make one readable line."""
    texts = [" ".join(str(i).split()) for i in items]

    def tail(n: int) -> str:
        return f"{sep}... and {n} more {noun}{'s' if n != 1 else ''}" if n else ""

    shown: list[str] = []
    for t in texts[:most]:
        room = chars - len(sep.join([*shown, ""])) - len(tail(len(texts) - len(shown) - 1))
        if len(t) <= room:
            shown.append(t)
            continue
        if not shown:  # the first alone is too long: cut it, keep the count
            shown.append(t[: max(room, 40) - 1] + "…")
        break
    return sep.join(shown) + tail(len(texts) - len(shown))


def short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- type rules -------------------------------------------------------------------------
def normalise_type(t: pa.DataType) -> pa.DataType:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if t == pa.large_string() or t == pa.string_view():
        return pa.string()
    return t


def type_problem(name: str, actual: pa.DataType, expected: pa.DataType) -> Problem | None:
    """None if ``actual`` may be cast safely to ``expected``; else why not."""
    a = normalise_type(actual)
    if a == expected or pa.types.is_null(a):
        return None
    ok = False
    why = "not a safe cast"
    if pa.types.is_integer(a) and (pa.types.is_integer(expected) or pa.types.is_floating(expected)):
        ok = True  # value-checked on cast
    elif pa.types.is_floating(a) and pa.types.is_floating(expected):
        ok = a.bit_width <= expected.bit_width
        why = "narrowing a float loses precision"
    elif pa.types.is_floating(a) and pa.types.is_integer(expected):
        why = "a float column would be truncated to integers"
    elif pa.types.is_timestamp(a) and pa.types.is_timestamp(expected):
        if (a.tz is None) != (expected.tz is None):
            why = "time zone mismatch: " + (
                "naive timestamps" if a.tz is None else "zoned timestamps"
            )
        else:
            ok = True  # unit change value-checked; another zone is the same instant
    elif pa.types.is_string(a) and not pa.types.is_string(expected):
        why = "text where the contract has " + str(expected)
    elif pa.types.is_string(expected):
        why = f"{a} where the contract has text"
    if ok:
        return None
    return Problem(why, name, str(expected), str(actual))


def schema_problems(actual: pa.Schema, expected: pa.Schema) -> list[Problem]:
    """Missing and extra columns, and types that cannot be cast safely."""
    problems: list[Problem] = []
    for f in expected:
        idx = actual.get_field_index(f.name)
        if idx < 0:
            problems.append(Problem("missing", f.name, str(f.type), "no such column"))
            continue
        p = type_problem(f.name, actual.field(idx).type, f.type)
        if p:
            problems.append(p)
    extra = [n for n in actual.names if expected.get_field_index(n) < 0]
    for n in extra:
        problems.append(
            Problem("not in the contract (undeclared columns are refused)", n, "no such column",
                    str(actual.field(n).type))
        )  # fmt: skip
    return problems


def cast_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Select and cast to ``schema`` (safe casts); ObjectBad naming the column that fails,
    and nulls in a not-null column."""
    cols = []
    for f in schema:
        col = batch.column(batch.schema.get_field_index(f.name))
        if not f.nullable and col.null_count:
            raise ObjectBad(
                [Problem(f"{col.null_count} null value(s)", f.name, "not null", "nulls")]
            )
        if col.type != f.type:
            try:
                col = col.cast(f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ObjectBad(
                    [Problem(_cast_reason(exc), f.name, str(f.type), str(col.type))]
                ) from None
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def _cast_reason(exc: BaseException) -> str:
    text = short(exc, 160)
    if "zone offset" in text:
        return "time zone mismatch: " + text.split(":")[0].replace(
            "Failed to parse string", "value"
        )
    return text


# -- readers ----------------------------------------------------------------------------
def parquet_batches(fh: Any, schema: pa.Schema) -> Batches:
    try:
        pf = pq.ParquetFile(fh)
    except Exception as exc:
        raise ObjectBad([Problem(f"not a readable Parquet file ({short(exc)})")]) from None
    problems = schema_problems(pf.schema_arrow, schema)
    if problems:
        raise ObjectBad(problems)
    for rg in range(pf.num_row_groups):
        it = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=schema.names)
        while True:
            try:
                batch = next(it, None)
            except Exception as exc:
                if _io_failure(exc):
                    raise
                col = _column_at_fault(pf, schema.names, rg)
                where = f"row group {rg} is corrupt or truncated ({short(exc)})"
                raise ObjectBad([Problem(where, col)]) from None
            if batch is None:
                break
            yield cast_batch(batch, schema)


def _io_failure(exc: BaseException) -> bool:
    """A storage failure (re-raised as such), not a problem of the object's bytes."""
    # Arrow reports bad bytes as a plain OSError without errno; storage failures come as
    # the file object's own exception types (or carry an errno).
    if not isinstance(exc, OSError):
        return False
    return type(exc) is not OSError or exc.errno is not None


def _column_at_fault(pf: pq.ParquetFile, names: list[str], row_group: int) -> str | None:
    for name in names:
        try:
            pf.read_row_group(row_group, columns=[name])
        except Exception:
            return name
    return None


def _line_blocks(fh: Any) -> Iterator[tuple[int, bytes]]:
    """``fh`` in blocks of whole lines, each with the number of its first line (from 1).

    A block is a read of BLOCK_BYTES up to its last line end (``\\n`` or ``\\r``), after the
    previous read's partial line: the cuts of Arrow's streaming CSV and JSON readers, so the
    batches are the same. A read without a line end grows the partial line, up to
    MAX_LINE_BYTES; a longer line is ObjectBad naming it. A storage failure of ``fh.read``
    is raised as it is.
    """
    parts: list[bytes] = []  # the partial line so far
    held = 0
    line = 1
    while True:
        data = fh.read(BLOCK_BYTES)
        if not data:
            if parts:
                yield line, b"".join(parts)
            return
        cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if cut < 0:
            parts.append(data)
            held += len(data)
            if held > MAX_LINE_BYTES:
                raise ObjectBad([_too_long(line, held, "over ")])
            continue
        if held:  # the partial line ends in this read
            end = min(i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0)
            if held + end > MAX_LINE_BYTES:
                raise ObjectBad([_too_long(line, held + end, "")])
        block = b"".join([*parts, data[: cut + 1]])
        parts, held = ([data[cut + 1 :]], len(data) - cut - 1) if cut + 1 < len(data) else ([], 0)
        yield line, block
        line += block.count(b"\n")


def _ahead(
    blocks: Iterator[tuple[int, bytes]], parse: Callable[[bytes], T]
) -> Generator[T, None, None]:
    """``parse`` of each block, read and parsed in a worker thread one block ahead of the
    consumer (as Arrow's streaming readers overlap them, but never more than one block)."""

    def step() -> tuple[T] | None:
        item = next(blocks, None)
        return None if item is None else (parse(item[1]),)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aif-read") as pool:
        fut = pool.submit(step)
        try:
            while (got := fut.result()) is not None:
                fut = pool.submit(step)
                yield got[0]
        finally:
            fut.cancel()  # a read in flight finishes before the pool (and the file) closes


def _too_long(line: int, size: int, over: str) -> Problem:
    return Problem(
        f"line {line} is {over}{size / 1e6:.1f} MB, longer than the longest line read "
        f"({MAX_LINE_BYTES >> 20} MiB)"
    )


def _block_size(block: bytes) -> int:
    """Arrow's block size for parsing ``block`` as one block (one batch)."""
    return max(BLOCK_BYTES, len(block) + 1)


_CSV_COL = re.compile(r"In CSV column #(\d+): (.*)")


def _csv_header(head: bytes) -> list[str] | None:
    line = head.split(b"\n", 1)[0]
    try:
        return pacsv.read_csv(
            io.BytesIO(line + b"\n"),
            read_options=pacsv.ReadOptions(autogenerate_column_names=False),
            convert_options=pacsv.ConvertOptions(column_types={}, strings_can_be_null=False),
        ).schema.names
    except Exception:
        return None


def csv_batches(fh: Any, schema: pa.Schema) -> Batches:
    types = {f.name: f.type for f in schema}
    convert = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)
    blocks = _line_blocks(fh)
    first = next(blocks, None)
    if first is None:  # an empty object: the reader's own words for it
        _parse_csv(b"", None, convert, None, types)
        return
    header = _csv_header(first[1])
    if header is not None:
        names_only = pa.schema(
            [pa.field(n, types.get(n, pa.string())) for n in header]  # types checked below
        )
        problems = schema_problems(names_only, schema)
        if problems:
            raise ObjectBad(problems)
    table = _parse_csv(first[1], None, convert, header, types)
    names = table.schema.names
    problems = schema_problems(table.schema, schema)
    if problems:
        raise ObjectBad(problems)
    rest = _ahead(blocks, lambda block: _parse_csv(block, names, convert, header, types))
    with contextlib.closing(rest):  # stops the read-ahead when the consumer stops
        for t in itertools.chain([table], rest):
            for batch in t.to_batches():
                if batch.num_rows:
                    yield cast_batch(batch, schema)


def _parse_csv(block: bytes, names: list[str] | None, convert: pacsv.ConvertOptions,
               header: list[str] | None, types: dict[str, Any]) -> pa.Table:  # fmt: skip
    """One block as one batch: the first block with its header, later ones with ``names``."""
    try:
        return pacsv.read_csv(
            io.BytesIO(block),
            read_options=pacsv.ReadOptions(
                block_size=_block_size(block), column_names=names, use_threads=False
            ),
            convert_options=convert,
        )
    except Exception as exc:
        if _io_failure(exc):
            raise
        raise ObjectBad([_csv_problem(exc, names or header, types)]) from None


def _csv_problem(exc: BaseException, names: list[str] | None, types: dict[str, Any]) -> Problem:
    text = short(exc)
    m = _CSV_COL.search(text)
    if m and names is not None and int(m.group(1)) < len(names):
        name = names[int(m.group(1))]
        why = m.group(2)
        if "invalid UTF8" in why:
            return Problem("not valid UTF-8 text", name, "UTF-8 text", "invalid bytes")
        if "zone offset" in why:
            return Problem(
                "time zone mismatch", name, str(types.get(name)), "timestamps without a zone"
            )
        value = re.search(r"invalid value '([^']*)'", why)
        actual = f"value {value.group(1)!r}" if value else why
        return Problem("cannot convert", name, str(types.get(name)), actual)
    if "invalid UTF8" in text or "UTF8" in text:
        return Problem(f"not valid UTF-8 text ({text})")
    if "Expected" in text and "columns" in text:
        return Problem(f"truncated or malformed CSV ({text})")
    return Problem(f"not a readable CSV file ({text})")


_JSON_COL = re.compile(r"Column\(/([^)]*)\)")


def jsonl_batches(fh: Any, schema: pa.Schema) -> Batches:
    # Timestamps are read as text and cast here, so that a missing or unexpected zone is
    # an error (the JSON reader would take a naive time as UTC).
    explicit = pa.schema(
        [pa.field(f.name, pa.string()) if pa.types.is_timestamp(f.type) else f for f in schema]
    )
    # Only text columns are declared (others are inferred, then cast safely), all nullable:
    # nulls in a not-null column are counted and reported by cast_batch.
    explicit = pa.schema([f.with_nullable(True) for f in explicit if pa.types.is_string(f.type)])
    parse = pajson.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="infer")
    blocks = _line_blocks(fh)
    tables: list[pa.Table] = []
    for first_line, block in blocks:  # as Arrow's streaming reader: the first block with
        if first_line == 1:  # rows fixes the schema of the following ones
            _check_required_keys(block.split(b"\n", 1)[0], schema)
        table = _parse_json(block, parse)
        if table.num_rows:
            tables.append(table)
            break
    if tables:
        fixed = pajson.ParseOptions(explicit_schema=tables[0].schema,
                                    unexpected_field_behavior="error")  # fmt: skip
        rest = _ahead(blocks, lambda block: _parse_json(block, fixed))
        with contextlib.closing(rest):  # stops the read-ahead when the consumer stops
            for t in itertools.chain(tables, rest):
                for batch in t.to_batches():
                    if not batch.num_rows:
                        continue
                    _check_utf8(batch)
                    batch = _parse_timestamps(_add_missing_nullable(batch, schema), schema)
                    problems = schema_problems(batch.schema, schema)
                    if problems:
                        raise ObjectBad(problems)
                    yield cast_batch(batch, schema)


def _parse_json(block: bytes, parse: pajson.ParseOptions) -> pa.Table:
    try:
        return pajson.read_json(
            io.BytesIO(block),
            read_options=pajson.ReadOptions(block_size=_block_size(block), use_threads=False),
            parse_options=parse,
        )
    except Exception as exc:
        if _io_failure(exc):
            raise
        raise ObjectBad([_json_problem(exc)]) from None


def _check_required_keys(first: bytes, schema: pa.Schema) -> None:
    """The first record lacks a not-null key of the contract: refused before parsing."""
    if not first.strip():
        return
    try:
        keys = json.loads(first)
    except ValueError:
        return
    if isinstance(keys, dict):
        missing = [f for f in schema if f.name not in keys and not f.nullable]
        if missing:
            raise ObjectBad(
                [Problem("missing", f.name, str(f.type), "no such key") for f in missing]
            )


def _add_missing_nullable(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """A nullable key absent from every row of a block is all nulls, not a missing column."""
    for f in schema:
        if f.nullable and batch.schema.get_field_index(f.name) < 0:
            batch = batch.append_column(f.name, pa.nulls(batch.num_rows, pa.null()))
    return batch


def _check_utf8(batch: pa.RecordBatch) -> None:
    """The JSON reader does not validate text: check every string column's UTF-8."""
    for name, col in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_string(col.type):
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                raise ObjectBad(
                    [Problem("not valid UTF-8 text", name, "UTF-8 text", "invalid bytes")]
                ) from None


def _parse_timestamps(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """JSON has no timestamp type: parse the contract's timestamp columns from ISO text,
    requiring a zone offset exactly when the contract has a zone."""
    arrays, changed = list(batch.columns), False
    for f in schema:
        i = batch.schema.get_field_index(f.name)
        if i < 0 or not pa.types.is_timestamp(f.type) or not pa.types.is_string(arrays[i].type):
            continue
        try:
            arrays[i] = arrays[i].cast(f.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ObjectBad([Problem(_cast_reason(exc), f.name, str(f.type), "text")]) from None
        changed = True
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names) if changed else batch


def _json_problem(exc: BaseException) -> Problem:
    text = short(exc)
    m = _JSON_COL.search(text)
    if m:
        return Problem(text.split(": ", 1)[-1], m.group(1))
    if "UTF8" in text or "UTF-8" in text:
        return Problem(f"not valid UTF-8 text ({text})")
    return Problem(f"not valid JSON Lines ({text})")


READERS = {"parquet": parquet_batches, "csv": csv_batches, "jsonl": jsonl_batches}
