"""Building checks from specs: the factories, the parameter whitelist, tiers.

Everything that can be checked without a completion (params, patterns, schemas, custom
callables and their parameters) is checked here, so a broken job line is rejected once
at ingestion instead of failing on every request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from batchroute.validators import safety
from batchroute.validators.base import Validator, ValidatorError
from batchroute.validators.callables import (
    _Agree,
    _AnswerIn,
    _Consensus,
    _Custom,
    _ScorerCheck,
    _Unresolved,
)
from batchroute.validators.checks import (
    _Choices,
    _FinishReason,
    _Json,
    _JsonSchema,
    _Length,
    _LogprobConfidence,
    _NonEmpty,
    _normalise_label,
    _PythonSyntax,
    _Regex,
)
from batchroute.validators.params import _MISSING, _check_signature, _Params, _resolve_callable

# None means "custom mapping not known yet": see validate_specs.
_Mapping = Mapping[str, str] | None
_Factory = Callable[[str, _Params, _Mapping], Validator]


def _make_non_empty(name: str, p: _Params, custom: _Mapping) -> Validator:
    return _NonEmpty(name)


def _make_finish_reason(name: str, p: _Params, custom: _Mapping) -> Validator:
    return _FinishReason(name, p.str_list("allowed", ["stop", "end_turn", "tool_calls"]))


def _make_choices(name: str, p: _Params, custom: _Mapping) -> Validator:
    choices = p.str_list("choices")
    if any(not _normalise_label(c) for c in choices):
        raise p.error("'choices' must not contain labels that are only quotes or punctuation")
    return _Choices(name, choices, p.flag("case_sensitive", False))


def _make_json(name: str, p: _Params, custom: _Mapping) -> Validator:
    return _Json(name)


def _make_json_schema(name: str, p: _Params, custom: _Mapping) -> Validator:
    schema = p.raw("schema")
    if not isinstance(schema, dict):
        raise p.error("'schema' must be a JSON Schema object")
    problem = safety.schema_problem(schema)
    if problem is not None:
        raise p.error(f"'schema' is not a valid JSON Schema: {problem}")
    return _JsonSchema(name, schema)


def _pattern(p: _Params, key: str, pattern: str, flags: str = "",
             case_sensitive: bool = True) -> safety.Pattern:
    try:
        return safety.compile_pattern(pattern, flags, case_sensitive=case_sensitive)
    except safety.PatternError as exc:
        raise p.error(f"{key if exc.field == 'pattern' else exc.field!r} {exc}") from None


def _make_regex(name: str, p: _Params, custom: _Mapping) -> Validator:
    pattern = p.string("pattern")
    flags = p.raw("flags")
    if flags is _MISSING:
        flags = ""
    if not isinstance(flags, str):
        raise p.error("'flags' must be a string of letters, e.g. \"im\"")
    mode = p.string("mode", default="search")
    if mode not in ("search", "fullmatch"):
        raise p.error(f"'mode' must be 'search' or 'fullmatch', got {mode!r}")
    return _Regex(name, _pattern(p, "pattern", pattern, flags), mode)


def _length_factory(upper: bool) -> _Factory:
    prefix = "max" if upper else "min"

    def make(name: str, p: _Params, custom: _Mapping) -> Validator:
        limits: dict[str, int] = {}
        for unit in ("chars", "words"):
            value = p.positive_int(f"{prefix}_{unit}")
            if value is not None:
                limits[unit] = value
        if not limits:
            raise p.error(f"needs '{prefix}_chars' and/or '{prefix}_words'")
        return _Length(name, limits, upper)

    return make


def _make_python_syntax(name: str, p: _Params, custom: _Mapping) -> Validator:
    test_name: str | None = None
    test = None
    if p.has("test"):
        test_name = p.string("test")
        if custom is not None:
            test = _resolve_callable(p, "test", test_name, custom)
            _check_signature(p, test, f"test {test_name!r}", "")
    return _PythonSyntax(name, test_name, test)


def _make_logprob_confidence(name: str, p: _Params, custom: _Mapping) -> Validator:
    threshold = p.number("threshold")
    if threshold > 0:
        # Log-probabilities are never positive; 0.8 almost always means someone
        # meant a probability, and would escalate every single job.
        raise p.error("'threshold' is a mean token log-probability and must be <= 0, e.g. -0.5")
    return _LogprobConfidence(name, threshold, p.flag("missing_ok", False))


def _make_consensus(name: str, p: _Params, custom: _Mapping) -> Validator:
    k = p.positive_int("k")
    if k is None or k < 2:
        raise p.error("'k' (samples to compare) must be an integer >= 2")
    min_agree = p.positive_int("min_agree")
    if min_agree is None:
        min_agree = k // 2 + 1
    if min_agree > k:
        raise p.error(f"'min_agree' ({min_agree}) cannot exceed 'k' ({k})")
    extract = None
    if p.has("extract"):
        extract = p.string("extract")
        compiled = _pattern(p, "extract", extract)
        if compiled.groups > 1:
            raise p.error("'extract' may have at most one group (the answer)")
    return _Consensus(name, k, min_agree, extract, p.flag("case_sensitive", False))


def _extract(p: _Params) -> str | None:
    if not p.has("extract"):
        return None
    extract = p.string("extract")
    if _pattern(p, "extract", extract).groups > 1:
        raise p.error("'extract' may have at most one group (the answer)")
    return extract


def _make_agree(name: str, p: _Params, custom: _Mapping) -> Validator:
    min_agree = p.positive_int("min_agree")
    if min_agree is None:
        min_agree = 2
    if min_agree < 2:
        raise p.error("'min_agree' (answers that must agree, this one included) must be >= 2")
    return _Agree(name, min_agree, _extract(p), p.flag("case_sensitive", False))


def _make_answer_in(name: str, p: _Params, custom: _Mapping) -> Validator:
    labels = p.str_list("labels")
    if not labels:
        raise p.error("'labels' must list at least one answer to keep")
    return _AnswerIn(name, labels, _extract(p), p.flag("case_sensitive", False))


def _make_scorer(name: str, p: _Params, custom: _Mapping) -> Validator:
    from batchroute import scorer

    threshold = p.number("threshold")
    if not 0.0 <= threshold <= 1.0:
        raise p.error("'threshold' is a probability (P(answer correct)) in [0, 1]")
    if p.has("model") == p.has("model_file"):
        raise p.error("give exactly one of 'model_file' (a JSON file written by "
                      "`batchroute calibrate`) or 'model' (the same JSON inline)")
    try:
        if p.has("model_file"):
            path = p.string("model_file")
            model = scorer.load(path)
            label = path.rsplit("/", 1)[-1]
        else:
            model = scorer.Scorer.from_dict(p.raw("model"), "'model'")
            label = "inline"
    except scorer.ScorerError as e:
        raise p.error(str(e)) from None
    return _ScorerCheck(name, model, threshold, label)


def _make_custom(name: str, p: _Params, custom: _Mapping) -> Validator:
    custom_name = p.string("name") if name == "custom" else name
    params = p.rest()
    if custom is None:
        return _Unresolved(name, custom_name)
    func = _resolve_callable(p, "name", custom_name, custom)
    _check_signature(p, func, f"custom validator {custom_name!r}", None, **params)
    return _Custom(name, custom_name, func, params)


_BUILTINS: dict[str, _Factory] = {
    "non_empty": _make_non_empty,
    "finish_reason": _make_finish_reason,
    "choices": _make_choices,
    "json": _make_json,
    "json_schema": _make_json_schema,
    "regex": _make_regex,
    "max_length": _length_factory(upper=True),
    "min_length": _length_factory(upper=False),
    "python_syntax": _make_python_syntax,
    "logprob_confidence": _make_logprob_confidence,
    "consensus": _make_consensus,
    "scorer": _make_scorer,
    "agree": _make_agree,
    "answer_in": _make_answer_in,
    "custom": _make_custom,
}

# Unknown parameters are errors because a misspelt one silently disables a check.
# Custom validators are absent: their extra keys are passed to the callable.
_KNOWN_PARAMS: dict[str, frozenset[str]] = {
    "non_empty": frozenset(),
    "finish_reason": frozenset({"allowed"}),
    "choices": frozenset({"choices", "case_sensitive"}),
    "json": frozenset(),
    "json_schema": frozenset({"schema"}),
    "regex": frozenset({"pattern", "flags", "mode"}),
    "max_length": frozenset({"max_chars", "max_words"}),
    "min_length": frozenset({"min_chars", "min_words"}),
    "python_syntax": frozenset({"test"}),
    "logprob_confidence": frozenset({"threshold", "missing_ok"}),
    "consensus": frozenset({"k", "min_agree", "extract", "case_sensitive"}),
    "scorer": frozenset({"threshold", "model_file", "model"}),
    "agree": frozenset({"min_agree", "extract", "case_sensitive"}),
    "answer_in": frozenset({"labels", "extract", "case_sensitive"}),
}

#: Spec types this module builds (custom names registered by the operator come on top).
VALIDATOR_TYPES = frozenset(_BUILTINS)

#: Spec types that cannot be built here. Empty since `consensus` reads the choices of
#: one completion; kept because callers import it.
PIPELINE_TYPES: frozenset[str] = frozenset()


def _tiers(value: Any, where: str) -> list[int]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1
                       for t in value)):
        raise ValidatorError(f"{where}: 'tiers' must be a non-empty list of tiers (integers >= 1)")
    return list(value)


def specs_for_tier(specs: Sequence[Mapping[str, Any]], tier: int) -> list[dict[str, Any]]:
    """The specs that apply to an attempt at `tier`, without their "tiers" key.

    Specs without "tiers" apply everywhere. Calibrated configs use it to run a check
    (e.g. consensus, which multiplies the completion tokens by k) only on the cheap
    tiers whose answers it decides to keep or escalate.
    """
    out: list[dict[str, Any]] = []
    for spec in specs:
        tiers = spec.get("tiers") if isinstance(spec, Mapping) else None
        if tiers is None:
            out.append(dict(spec))
        elif isinstance(tiers, list) and tier in tiers:
            out.append({k: v for k, v in spec.items() if k != "tiers"})
    return out


def _build_one(index: int, spec: Any, custom: _Mapping) -> Validator:
    where = f"validators[{index}]"
    if not isinstance(spec, Mapping):
        raise ValidatorError(f"{where}: must be an object with a 'type', got {type(spec).__name__}")
    vtype = spec.get("type")
    if not isinstance(vtype, str) or not vtype:
        raise ValidatorError(f"{where}: 'type' must be a non-empty string")
    if "tiers" in spec:
        _tiers(spec["tiers"], f"{where} ({vtype})")
        spec = {k: v for k, v in spec.items() if k != "tiers"}
    p = _Params(spec, f"{where} ({vtype})")
    # Built-ins win over a same-named custom entry so a spec means the same thing
    # on every deployment.
    factory = _BUILTINS.get(vtype)
    if factory is None and custom is not None and vtype in custom:
        factory = _make_custom
    if factory is None:
        if vtype in PIPELINE_TYPES:
            raise ValidatorError(
                f"{where}: {vtype!r} compares several completions and is run by the pipeline; "
                "remove it before building per-completion validators"
            )
        types = ", ".join(sorted(VALIDATOR_TYPES | set(custom or ())))
        hint = ""
        if custom is None:
            hint = '; name custom validators as {"type": "custom", "name": ...}'
        raise ValidatorError(f"{where}: unknown type {vtype!r} (known: {types}){hint}")
    params = _KNOWN_PARAMS.get(vtype)
    if params is not None:
        p.reject_unknown(params)
    return factory(vtype, p, custom)


def build_validators(
    specs: list[dict[str, Any]], custom: Mapping[str, str] | None = None
) -> list[Validator]:
    """Build checks from job specs, failing on the first bad one.

    Everything that can be checked without a completion (params, regexes, schemas,
    custom callables and their parameters) is checked here, so a broken job line
    is rejected once instead of failing on every request.
    """
    return _build_all(specs, dict(custom or {}))


class _Unbuildable:
    """Stands for specs that no longer build on a worker (a job stored before a limit
    existed, e.g. a backreference pattern now refused by RE2): the answer fails with the
    reason, so the job ends validation_failed instead of crashing every attempt after a
    paid call."""

    def __init__(self, reason: str) -> None:
        self.name = "validators"
        self.reason = reason

    def check(self, completion: Any) -> Any:
        from batchroute.validators.base import Verdict

        return Verdict(self.name, False, f"validators cannot be built: {self.reason}")


def build_for_run(specs: list[dict[str, Any]], custom: Mapping[str, str] | None = None,
                  ) -> list[Validator]:
    """build_validators for a worker about to judge a paid answer: never raises for a
    bad spec (see _Unbuildable)."""
    try:
        return build_validators(specs, custom)
    except ValidatorError as exc:
        return [_Unbuildable(str(exc))]


def validate_specs(specs: list[dict[str, Any]], custom: Mapping[str, str] | None = None) -> None:
    """Ingestion-time check of a job line's specs: the same checks as building, so
    lines that would fail on the workers are rejected up front.

    Without `custom`, custom checks are only checked for shape (a "custom" spec with
    a string "name", a python_syntax "test" string): config loading and line parsing
    may not have the operator's mapping at hand, and the name is then checked
    against it by the caller. The {"type": <custom name>} shorthand needs the
    mapping to be told apart from a typo, so it is rejected without one.
    """
    _build_all(specs, None if custom is None else dict(custom))


def _build_all(specs: Any, custom: _Mapping) -> list[Validator]:
    if not isinstance(specs, list):
        raise ValidatorError(f"validators: must be a list of objects, got {type(specs).__name__}")
    return [_build_one(i, spec, custom) for i, spec in enumerate(specs)]


def validators_for_response_format(response_format: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Derive checks from the request's own response_format.

    Providers' structured-output modes are not honoured by every tier (or every
    provider behind the same API), so a request that asked for JSON gets checked
    for JSON regardless of who answered it.
    """
    if not isinstance(response_format, dict):
        return []
    kind = response_format.get("type")
    if kind == "json_object":
        return [{"type": "json"}]
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if schema is None:
            schema = response_format.get("schema")
        if isinstance(schema, dict):
            return [{"type": "json_schema", "schema": schema}]
        return [{"type": "json"}]
    return []

