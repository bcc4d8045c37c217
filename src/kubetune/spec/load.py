"""Load a run spec: YAML → `--set` overrides → `RunSpec`, with every problem reported at once.

Each problem names the dotted field path and, when the key came from the file, `file:line`;
misspelt keys get a did-you-mean from the fields allowed at that place.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.errors import Problem, SpecError, UsageError
from kubetune.spec.models import RunSpec

Path_ = tuple[str | int, ...]


def load_spec(path: str | Path, overrides: list[str] | None = None) -> RunSpec:
    """Read, override and validate the spec at ``path``; raise SpecError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"spec file not found: {path}", "pass the path of a run spec, e.g. examples/quickstart.yaml")
    except OSError as exc:
        raise UsageError(f"cannot read spec {path}: {exc.strerror}")
    except UnicodeDecodeError:
        raise UsageError(f"spec {path} is not UTF-8 text", "a run spec is a YAML file (kubetune schema describes it)")
    raw, lines = parse_yaml(text, str(path))
    set_paths: dict[Path_, str] = {}
    for item in overrides or []:
        key_path, value = parse_override(item)
        apply_override(raw, key_path, value, item)
        set_paths[key_path] = item
    return validate_spec(raw, str(path), lines, set_paths)


def load_spec_text(text: str, where: str) -> RunSpec:
    """A spec from text read elsewhere (a run's spec.yaml in object storage); `where` names it in errors."""
    raw, lines = parse_yaml(text, where)
    return validate_spec(raw, where, lines, {})


def parse_yaml(text: str, filename: str) -> tuple[dict[str, Any], dict[Path_, int]]:
    """Parse YAML into plain data plus a map from key path to 1-based line number."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise SpecError([Problem(where, f"not valid YAML: {getattr(exc, 'problem', exc)}")])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([Problem(f"{filename}:1", "a run spec is a YAML mapping of sections (name, model, data, ...)")])
    lines: dict[Path_, int] = {}
    _index_lines(node, (), lines)
    return data, lines


def _index_lines(node: yaml.Node | None, prefix: Path_, out: dict[Path_, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            out[key] = key_node.start_mark.line + 1
            _index_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*prefix, i)
            out[key] = item.start_mark.line + 1
            _index_lines(item, key, out)


def parse_override(item: str) -> tuple[Path_, Any]:
    """``a.b.0.c=value`` → (('a','b',0,'c'), YAML-typed value)."""
    key, sep, value_text = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {item!r}: expected key.path=value", "e.g. --set train.learning_rate=1e-4")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {item!r}: value is not valid YAML ({exc})")
    # YAML 1.1 reads 1e-4 as a string; a user writing a number means a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") and not value.startswith(".") else value
        except ValueError:
            pass
    parts: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    return tuple(parts), value


def apply_override(raw: dict[str, Any], key_path: Path_, value: Any, item: str) -> None:
    node: Any = raw
    for depth, part in enumerate(key_path[:-1]):
        nxt = key_path[depth + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise UsageError(f"--set {item!r}: {_dotted(key_path[:depth + 1])} is not an index of that list")
            if not isinstance(node[part], (dict, list)):
                node[part] = {"path": node[part]} if isinstance(node[part], str) else {}
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise UsageError(f"--set {item!r}: {_dotted(key_path[:depth])} is not a section")
        child = node.get(part)
        if not isinstance(child, (dict, list)):
            # A one-source shorthand (train: file.jsonl) addressed by index becomes a list of it.
            child = ([] if child is None else [child]) if isinstance(nxt, int) else {}
            node[part] = child
        node = child
    last = key_path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last > len(node):
            raise UsageError(f"--set {item!r}: index {last} is out of range")
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        node[last] = value


def validate_spec(
    raw: dict[str, Any], filename: str = "<spec>", lines: dict[Path_, int] | None = None,
    set_paths: dict[Path_, str] | None = None,
) -> RunSpec:
    """Validate plain data into a RunSpec, translating pydantic errors into located Problems."""
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as exc:
        errors = list(exc.errors())
        if not any(err["type"] == "cross" for err in errors):
            errors += _cross_field_errors(raw, errors)
        problems = [_to_problem(err, raw, filename, lines or {}, set_paths or {}) for err in errors]
        problems = [p for group in problems for p in group]
        hint = "run `kubetune schema` for every field and its meaning"
        raise SpecError(_dedupe(problems), hint) from None


# Placeholders for required fields, so cross-field rules can run while those fields are broken.
_REQUIRED = {("name",): "placeholder", ("model",): {}, ("model", "base"): "placeholder", ("data",): {},
             ("data", "train"): ["placeholder"]}


def _cross_field_errors(raw: dict[str, Any], errors: list[Any]) -> list[Any]:
    """The cross-field rules, checked on the spec with every broken field set back to its default
    (pydantic runs them only when every field is valid): field and cross-field problems come in one
    report. A rule that points at a field that was itself broken is left out (its default spoke)."""
    import copy

    data = copy.deepcopy(raw)
    reset: set[Path_] = set()
    for _ in range(5):
        for err in errors:
            loc = _clean_loc(tuple(err["loc"]), data)
            if err["type"] == "missing" and loc in _REQUIRED:
                _set(data, loc, copy.deepcopy(_REQUIRED[loc]))
            else:
                loc = _drop(data, loc)
            reset.add(loc)
        try:
            RunSpec.model_validate(data)
            return []
        except ValidationError as exc:
            errors = list(exc.errors())
        except Exception:  # noqa: BLE001 - a best-effort extra: the field problems are reported regardless
            return []
        cross = [err for err in errors if err["type"] == "cross"]
        if cross:
            rows = [row for row in cross[0]["msg"].split("\n")
                    if not any(_under(tuple(int(p) if p.isdigit() else p for p in row.split("\t")[0].split(".")), r)
                               for r in reset)]
            return [{**cross[0], "msg": "\n".join(rows)}] if rows else []
    return []


def _under(path: Path_, prefix: Path_) -> bool:
    return path[: len(prefix)] == prefix or prefix[: len(path)] == path


def _set(data: dict[str, Any], loc: Path_, value: Any) -> None:
    node: Any = data
    for part in loc[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[loc[-1]] = value


def _drop(data: dict[str, Any], loc: Path_) -> Path_:
    """Remove the value at loc (a whole list when an item of it is broken); returns what was removed."""
    cut = next((i for i, p in enumerate(loc) if isinstance(p, int)), None)
    if cut is not None and cut == len(loc) - 1:
        loc = loc[:cut]
    node: Any = data
    for part in loc[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return loc
    if isinstance(node, dict) and loc:
        node.pop(loc[-1], None)
    return loc


def _to_problem(err: Any, raw: dict[str, Any], filename: str, lines: dict[Path_, int],
                set_paths: dict[Path_, str]) -> list[Problem]:
    loc = _clean_loc(tuple(err["loc"]), raw)
    if err["type"] == "cross":
        out = []
        for row in err["msg"].split("\n"):
            field, _, message = row.partition("\t")
            key = tuple(int(p) if p.isdigit() else p for p in field.split("."))
            out.append(Problem(_where(key, filename, lines, set_paths), message))
        return out
    where = _where(loc, filename, lines, set_paths)
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        name = str(loc[-1])
        close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
        msg = f"unknown key {name!r}"
        elsewhere = [f"{sec}.{name}" for sec in _section_names() if name in _allowed_keys((sec,))]
        if close:
            msg += f"; did you mean {close[0]!r}?"
        elif elsewhere:
            msg += f"; it belongs in {' or '.join(elsewhere)}"
        else:
            msg += f"; allowed here: {', '.join(sorted(allowed))}"
        return [Problem(where, msg)]
    if err["type"] == "missing":
        return [Problem(where, "required field is missing")]
    if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        return [Problem(where, f"expected a path/URI or a mapping such as {{path: ..., weight: 1}} (got {err.get('input')!r})")]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    if err["type"] not in ("missing",) and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    return [Problem(where, msg)]


def _clean_loc(loc: Path_, raw: dict[str, Any]) -> Path_:
    """Drop pydantic's union-branch names (e.g. 'str', 'DataSource') from an error location."""
    out: list[str | int] = []
    node: Any = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and not isinstance(part, int) and part[:1].islower() and "[" not in part:
            out.append(part)  # a missing key inside a real section
            node = None
        # else: a union/type tag such as 'DataSource' or 'literal[...]' — skip it
    return tuple(out)


def _where(loc: Path_, filename: str, lines: dict[Path_, int], set_paths: dict[Path_, str]) -> str:
    dotted = _dotted(loc) or "(top level)"
    for key, item in set_paths.items():
        if loc[: len(key)] == key:
            return f"--set {item}: {dotted}"
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{filename}:{lines[loc[:n]]}: {dotted}"
    return f"{filename}: {dotted}"


def _dotted(loc: Path_) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _allowed_keys(loc: Path_) -> list[str]:
    """Field names of the section at ``loc`` (walking the model classes, list items and unions)."""
    models: list[type[BaseModel]] = [RunSpec]
    for part in loc:
        nxt: list[type[BaseModel]] = []
        for model in models:
            if isinstance(part, int):
                nxt.append(model)
                continue
            field = model.model_fields.get(part)
            if field is not None:
                nxt.extend(_models_in(field.annotation))
        models = nxt
    return sorted({name for m in models for name in m.model_fields})


def _section_names() -> list[str]:
    return [name for name, f in RunSpec.model_fields.items() if _models_in(f.annotation)]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[Problem] = set()
    return [p for p in problems if not (p in seen or seen.add(p))]


def spec_to_yaml(spec: RunSpec) -> str:
    """The resolved spec (defaults filled) as YAML, for runs/NAME/spec.yaml."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
