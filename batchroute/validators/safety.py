"""Everything a job line supplies that could run away: patterns, schemas, nesting.

Job lines are untrusted, and three things in them used to be able to stop or reach
out of a worker:

* a regular expression with catastrophic backtracking (``(a+)+$``) held the GIL for
  minutes on Python's backtracking ``re``: patterns now compile on RE2 (google-re2),
  which matches in time linear in the text, and a pattern RE2 cannot run (back-
  references, lookaround) is an error at ingestion, naming the line;
* a JSON Schema ``$ref`` to ``http://`` or ``file://`` was fetched by jsonschema's
  deprecated fallback resolver: schemas are now resolved only within themselves, by a
  `referencing.Registry` whose retrieve function refuses every URI, and a non-local
  ``$ref`` is refused at ingestion;
* deep nesting (a 100-level schema or ``tools`` array in a 2 KB line) blew Python's
  recursion limit in whatever walked it next (``json.dumps``, jsonschema, the store):
  `value_problem` walks a parsed line iteratively and refuses anything nested deeper
  than `MAX_LINE_DEPTH`, and schemas deeper than `MAX_SCHEMA_DEPTH`.

It also refuses NUL characters in any string of a line (PostgreSQL cannot store
them, and one used to abort a whole ``submit``). The limits are deliberately far
above anything a real request needs.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import TYPE_CHECKING, Any

import re2

if TYPE_CHECKING:
    import referencing

# jsonschema and referencing are imported where a schema is checked (~50 ms at start-up,
# which every `submit` and worker paid though most batches have no json_schema check).

MAX_PATTERN_CHARS = 1000
#: Memory RE2 may use for one compiled pattern (its DFA cache); `a{1000}{1000}` is
#: refused at compile time instead of growing a worker.
PATTERN_MAX_MEM = 8 << 20
MAX_LINE_DEPTH = 64
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 10_000
MAX_SCHEMA_CHARS = 256 * 1024

#: Regex flag letters a spec may give, as RE2 inline flags. "a" (ASCII classes) is
#: accepted and a no-op: RE2's \w, \d, \s and \b are ASCII already.
REGEX_FLAGS = {"i": "i", "m": "m", "s": "s", "a": ""}


class PatternError(ValueError):
    """A pattern that is refused; str() says why, for the line's error, and `field` is
    what it is about ("pattern" or "flags"), for the caller to name the spec's key."""

    def __init__(self, message: str, field: str = "pattern") -> None:
        super().__init__(message)
        self.field = field


class JsonTooDeep(ValueError):
    """Nesting beyond the limit; str() is the reason."""


Pattern = Any  # re2._Regexp: the module ships no type stubs


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str, flags: str = "", *, case_sensitive: bool = True) -> Pattern:
    """Compile a pattern from job input on RE2, or raise PatternError.

    Cached: a batch repeats one pattern on every line, and workers rebuild a job's checks
    on every attempt (RE2 objects are safe to share between threads).

    The result has the `re.Pattern` methods the checks use (search, fullmatch,
    finditer, groups, pattern), all linear in the length of the text.
    """
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"is {len(pattern)} characters long, more than the "
                           f"{MAX_PATTERN_CHARS} allowed")
    inline = ""
    for letter in flags:
        if letter == "x":
            raise PatternError("has flag 'x' (verbose), which is not supported: patterns "
                               "run on RE2, a linear-time engine; remove the whitespace and "
                               "comments", "flags")
        if letter not in REGEX_FLAGS:
            raise PatternError(f"has unknown flag {letter!r} (use any of "
                               f"{''.join(REGEX_FLAGS)!r})", "flags")
        inline += REGEX_FLAGS[letter]
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the line's error, not stderr noise
    options.max_mem = PATTERN_MAX_MEM
    options.case_sensitive = case_sensitive
    text = f"(?{''.join(sorted(set(inline)))}){pattern}" if inline else pattern
    try:
        compiled = re2.compile(text, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        if isinstance(why, bytes):
            why = why.decode("utf-8", "replace")
        hint = ""
        if any(m in str(why) for m in ("invalid escape", "invalid perl operator",
                                       "bad repetition operator")):
            hint = " (RE2, linear-time: no backreferences or lookaround)"
        raise PatternError(f"is not a valid regular expression: {why}{hint}") from None
    return _PatternView(compiled, pattern)


class _PatternView:
    """An RE2 pattern that reports the pattern as written (without the inline flags
    added for the spec's "flags"), since reasons quote it back to the user."""

    def __init__(self, compiled: Any, pattern: str) -> None:
        self._compiled = compiled
        self.pattern = pattern
        self.groups: int = compiled.groups

    def search(self, text: str) -> Any:
        return self._compiled.search(text)

    def fullmatch(self, text: str) -> Any:
        return self._compiled.fullmatch(text)

    def finditer(self, text: str) -> Any:
        return self._compiled.finditer(text)


def cached_pattern(pattern: str, case_sensitive: bool) -> Pattern:
    """compile_pattern for consensus `extract` (compile_pattern is cached)."""
    return compile_pattern(pattern, case_sensitive=case_sensitive)


# ------------------------------------------------------------------------------ nesting


def value_problem(value: Any, max_depth: int = MAX_LINE_DEPTH) -> str | None:
    """Why a parsed JSON line cannot be taken, or None: nesting deeper than `max_depth`,
    or a NUL character in a string or key. Iterative, so it never recurses itself."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "$")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels (at {path})"
            for key, child in node.items():
                if "\x00" in key:
                    return f"a NUL character (\\u0000) in a key at {path}"
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1, f"{path}.{key[:40]}"))
                elif isinstance(child, str) and "\x00" in child:
                    return f"a NUL character (\\u0000) at {path}.{key[:40]}"
        elif isinstance(node, list):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels (at {path})"
            for i, child in enumerate(node):
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1, f"{path}[{i}]"))
                elif isinstance(child, str) and "\x00" in child:
                    return f"a NUL character (\\u0000) at {path}[{i}]"
        elif isinstance(node, str) and "\x00" in node:
            return f"a NUL character (\\u0000) at {path}"
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def unsendable(value: Any) -> str | None:
    """What json.dumps(allow_nan=False).encode() would refuse in a parsed line: a lone
    surrogate or a non-finite number ("surrogate"/"number"), else None. Iterative and
    copy-free, for lines too large to serialise a second time just to check them."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if _SURROGATE.search(key):
                    return "surrogate"
                stack.append(child)
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            if _SURROGATE.search(node):
                return "surrogate"
        elif isinstance(node, float) and not math.isfinite(node):
            return "number"
    return None


def text_may_be_deep(text: str | bytes, max_depth: int = MAX_LINE_DEPTH) -> bool:
    """Cheap pre-check (C-speed counts): a text with fewer opening brackets than the
    limit cannot nest deeper than it, so most lines skip the walk."""
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{") > max_depth
    return text.count("[") + text.count("{") > max_depth


def check_json_depth(value: Any, max_depth: int = MAX_LINE_DEPTH) -> None:
    """Raise JsonTooDeep for nesting beyond `max_depth` (an answer being checked)."""
    problem = value_problem(value, max_depth)
    if problem is not None and problem.startswith("nested"):
        raise JsonTooDeep(problem)


# ------------------------------------------------------------------------------ schemas


def _refuse(uri: str) -> referencing.Resource[Any]:
    """The registry's retrieve function: nothing outside the schema is ever fetched,
    not http://, not file://, not a path on disk."""
    import referencing.exceptions

    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]


@functools.lru_cache(maxsize=1)
def no_retrieval() -> referencing.Registry[Any]:
    """Resolves a schema's $refs only within the schema (and the meta-schemas bundled
    with jsonschema); passing it also switches off jsonschema's deprecated remote
    fallback. One registry per process, built on first use."""
    import referencing

    return referencing.Registry(retrieve=_refuse)  # type: ignore[call-arg]  # attrs init


def schema_shape_problem(schema: Any, where: str = "$") -> str | None:
    """Depth, size and $ref problems of a schema, checked iteratively before any
    recursive code (check_schema, a validator) sees it."""
    nodes = 0
    stack: list[tuple[Any, int, str]] = [(schema, 1, where)]
    while stack:
        node, depth, path = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            return f"has more than {MAX_SCHEMA_NODES} nodes"
        if isinstance(node, dict):
            if depth > MAX_SCHEMA_DEPTH:
                return f"is nested deeper than {MAX_SCHEMA_DEPTH} levels (at {path})"
            for key, child in node.items():
                if (key in ("$ref", "$dynamicRef", "$recursiveRef")
                        and isinstance(child, str) and not child.startswith("#")):
                    return (f"{path}.{key}: {child[:80]!r} is not a local reference "
                            "('#/...'); schemas are resolved only within themselves, "
                            "nothing is fetched")
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1, f"{path}.{str(key)[:40]}"))
        elif isinstance(node, list):
            if depth > MAX_SCHEMA_DEPTH:
                return f"is nested deeper than {MAX_SCHEMA_DEPTH} levels (at {path})"
            for i, child in enumerate(node):
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1, f"{path}[{i}]"))
    return None


def schema_validator(schema: dict[str, Any]) -> Any:
    """A jsonschema validator for a schema from job input that never retrieves."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    # Formats are asserted (not just annotated) because "date": "yesterday" is precisely
    # the kind of sloppy answer that should escalate.
    return cls(schema, format_checker=cls.FORMAT_CHECKER, registry=no_retrieval())


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why a schema from job input cannot be used, or None (shape first, then the
    meta-schema). Equal schemas repeat on thousands of lines: cached by canonical text
    (serialising is safe first: a job line's nesting is already bounded by MAX_LINE_DEPTH)."""
    try:
        key = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError):  # not plain JSON (e.g. a TOML date)
        return schema_shape_problem(schema) or _meta_problem(schema)
    if len(key) > MAX_SCHEMA_CHARS:
        return schema_shape_problem(schema) or (
            f"is {len(key)} characters long, more than the {MAX_SCHEMA_CHARS} allowed")
    return _schema_problem_cached(key)


@functools.lru_cache(maxsize=512)
def _schema_problem_cached(canonical: str) -> str | None:
    """check_schema walks the whole meta-schema (~20 ms) and a batch repeats one schema on
    thousands of lines (and every attempt rebuilds its validators): once per process."""
    schema = json.loads(canonical)
    return schema_shape_problem(schema) or _meta_problem(schema)


def _meta_problem(schema: dict[str, Any]) -> str | None:
    import jsonschema
    import jsonschema.exceptions

    from batchroute.validators.base import _MESSAGE, _json_path, _snip

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        return f"{_json_path(exc.absolute_path)}: {_snip(exc.message, _MESSAGE)}"
    except RecursionError:  # pragma: no cover - the shape check keeps schemas shallow
        return "is nested too deeply"
    return None


def tools_problem(tools: Any) -> str | None:
    """Schema-shape problems in a request's function-tool parameters (forwarded to the
    provider as they are, but never deeper or larger than a schema we would check)."""
    if not isinstance(tools, list):
        return None
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        params = fn.get("parameters") if isinstance(fn, dict) else None
        if params is not None:
            problem = schema_shape_problem(params, f"body.tools[{i}].function.parameters")
            if problem is not None:
                return problem
    return None
