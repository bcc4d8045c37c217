"""Read rows from a data source, remembering where each came from (``file:line``).

Local JSONL/JSON/CSV/Parquet are read here rather than through `datasets`, because a user fixing a
broken file needs the line number, and `datasets` does not keep it. Hub datasets (`hf://`) go
through `datasets.load_dataset`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetune.errors import DataError, Problem, UsageError
from kubetune.uris import has_scheme, hub_ref, is_hub

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
COMPRESSED = (".gz", ".zst")  # on top of .jsonl/.json/.csv: read through gzip / zstandard


@dataclass(frozen=True)
class Row:
    data: Any
    where: str  # file:line, or hf://name:split#index


@dataclass
class SourceRows:
    uri: str
    rows: list[Row]
    problems: list[Problem]  # rows that could not even be parsed (bad JSON)
    files: list[Path]


def read_source(uri: str) -> SourceRows:
    """All rows of one source (a file, a folder of files, or hf://org/name[:split][@revision])."""
    if is_hub(uri):
        return _read_hub(uri)
    files = local_files(uri)
    rows: list[Row] = []
    problems: list[Problem] = []
    for file in files:
        try:
            r, p = read_file(file)
        except (OSError, ValueError) as exc:  # unreadable or corrupt (pyarrow raises ValueError subclasses)
            r, p = [], [Problem(str(file), f"cannot read {file.suffix} file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")]
        rows += r
        problems += p
    if has_scheme(uri):  # fetched into the cache: report file:line against the URI, not the cache path
        local = str(fetched(uri))
        rows = [replace(row, where=row.where.replace(local, uri.rstrip("/"))) for row in rows]
        problems = [Problem(p.where.replace(local, uri.rstrip("/")), p.message) for p in problems]
    return SourceRows(uri, rows, problems, files)


def fetched(uri: str) -> Path:
    """The local copy of a data source: itself, or (s3://, gs://, pvc://) a verified copy in the cache."""
    from kubetune.storage.fetch import fetch

    return fetch(uri)


def local_files(uri: str) -> list[Path]:
    """The data files behind a local source (a file, or every supported file under a folder)."""
    path = fetched(uri) if has_scheme(uri) else Path(uri)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if data_suffix(p) in SUFFIXES and p.is_file())
        if not files:
            raise UsageError(f"data folder {uri} holds no {', '.join(SUFFIXES)} files (plain, .gz or .zst)")
        return files
    if path.is_file():
        return [path]
    raise UsageError(f"data source not found: {uri}", "check the path (relative paths are from the current folder)")


def data_suffix(path: Path) -> str:
    """The data format's suffix, under a compression suffix: train.jsonl.zst → .jsonl."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def read_file(path: Path) -> tuple[list[Row], list[Problem]]:
    """Rows of one file. JSON lines and a JSON document are told apart by their content, not their
    name: a Hub file that is one JSON array, saved as .jsonl, is still read as an array."""
    suffix = data_suffix(path)
    if suffix in (".jsonl", ".json"):
        text = _read_text(path)
        if _is_json_document(text, suffix):
            return _read_json(path, text)
        return _read_jsonl(path, text)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UsageError(f"{path}: unsupported file type {''.join(path.suffixes[-2:])!r}; use one of "
                     f"{', '.join(SUFFIXES)} (JSON and CSV also as .gz or .zst)")


def _read_text(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        import gzip

        with gzip.open(path, "rb") as fh:
            return fh.read().decode("utf-8", errors="replace")
    if name.endswith(".zst"):
        import zstandard

        try:
            with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as fh:
                return fh.read().decode("utf-8", errors="replace")
        except zstandard.ZstdError as exc:
            raise ValueError(f"not a zstd file ({exc})") from None
    return path.read_text(encoding="utf-8", errors="replace")


def _is_json_document(text: str, suffix: str) -> bool:
    """An array; or one object holding the rows ({"data": [...]}): in a .json file when the whole text
    is that object, in a .jsonl file when it is also not complete on its first line (one JSON line
    of one row is JSON lines)."""
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "{":
        return i < len(text) and text[i] == "["
    if suffix == ".jsonl" and _parses(text[i:].split("\n", 1)[0]):
        return False
    return _parses(text)  # broken either way: read as JSON lines, which reports it line by line


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _read_jsonl(path: Path, text: str) -> tuple[list[Row], list[Problem]]:
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row(json.loads(line), f"{path}:{n}"))
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"{path}:{n}", f"bad JSON: {exc.msg} (column {exc.colno})"))
    return rows, problems


def _read_json(path: Path, text: str) -> tuple[list[Row], list[Problem]]:
    """A JSON array of objects; each row keeps the line its object starts on."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i < len(text) and text[i] == "{":
        # A single object holding the rows under one key, e.g. {"data": [...]}, is common too.
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return [], [Problem(f"{path}:{exc.lineno}", f"bad JSON: {exc.msg}")]
        lists = [v for v in obj.values() if isinstance(v, list)] if isinstance(obj, dict) else []
        if len(lists) != 1:
            return [], [Problem(f"{path}:1", "expected a JSON array of rows (or an object with one list of rows)")]
        return [Row(r, f"{path}[{k}]") for k, r in enumerate(lists[0])], []
    if i >= len(text) or text[i] != "[":
        return [], [Problem(f"{path}:1", "expected a JSON array of rows; for one object per line use .jsonl")]
    rows: list[Row] = []
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            return rows, [Problem(f"{path}:{exc.lineno}", f"bad JSON: {exc.msg}; rows after this point were not read")]
        rows.append(Row(value, f"{path}:{line}"))
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
    if i >= len(text):
        return rows, [Problem(f"{path}:{text.count(chr(10)) + 1}", "bad JSON: the array is not closed (missing ']')")]
    return rows, []


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_csv(path: Path) -> tuple[list[Row], list[Problem]]:
    import io

    rows = []
    with io.StringIO(_read_text(path), newline="") as fh:
        reader = csv.DictReader(fh)
        start = 2
        for record in reader:
            rows.append(Row(dict(record), f"{path}:{start}"))
            start = reader.line_num + 1
    return rows, []


def _read_parquet(path: Path) -> tuple[list[Row], list[Problem]]:
    import pyarrow.parquet as pq  # heavy; only for parquet sources

    table = pq.read_table(path)
    return [Row(r, f"{path}#row{k + 1}") for k, r in enumerate(table.to_pylist())], []


def parse_hub_uri(uri: str) -> tuple[str, str, str | None]:
    """hf://org/name[:split][@revision] → (repo, split, revision)."""
    body, revision = hub_ref(uri)
    repo, _, split = body.partition(":")
    if repo.count("/") > 1 or not repo:
        raise UsageError(f"{uri}: expected hf://org/name[:split][@revision]")
    return repo, split or "train", revision or None


def _read_hub(uri: str) -> SourceRows:
    repo, split, revision = parse_hub_uri(uri)
    try:
        import datasets
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        ds = datasets.load_dataset(repo, split=split, revision=revision)
    except (ConnectionError, OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as exc:
        from kubetune.storage.model_files import hub_error

        error = hub_error(exc, f"cannot load dataset {repo!r} split {split!r} from the Hugging Face Hub",
                          "check the name, network access and HF_TOKEN; or copy the data to a local path "
                          "(without network: set HF_HUB_OFFLINE=1 and use a cached dataset)")
        if isinstance(error, UsageError):
            raise DataError([Problem(uri, error.message)], hint=error.hint) from None
        raise type(error)(f"{uri}: {error.message}", error.hint) from None
    rows = [Row(r, f"{uri}#{k}") for k, r in enumerate(ds)]
    return SourceRows(uri, rows, [], [])
