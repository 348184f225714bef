"""Deterministic answers: what the simulated model says, and whether it is any good.

The answer is a pure function of (model name, messages, response_format). That makes
the sim usable as a benchmark: a prompt that a cheap tier gets wrong gets it wrong on
every run, so escalation, caching and cost figures are reproducible, and two tiers
(different model names) fail on independent subsets of prompts, like real models.

The kind of answer is inferred from the request the way the example batches phrase
their tasks (see ``infer_kind``), and each kind has "bad" variants that look like what
real cheap models get wrong, so the validators have something realistic to catch.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import random
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchroute.sim.answers import natural

KINDS = ("json", "choices", "summary", "code", "list", "text")

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:['-][A-Za-z0-9]+)*")
_CHOICES_HEAD_RE = re.compile(r"answer with (?:exactly )?one of:?", re.I)
_CHOICES_RE = re.compile(r"answer with (?:exactly )?one of:?\s*(.+?)(?:\.|\n|$)", re.I)
_LABEL_SPLIT_RE = re.compile(r"\s*,\s*(?:or\s+)?|\s+or\s+", re.I)
_EXPECTED_RE = re.compile(r"^[ \t]*Expected:[ \t]*(.+?)[ \t]*$", re.M | re.I)
_SUMMARY_RE = re.compile(r"in at most (\d+) words", re.I)
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_QUOTES = "'\"`“”‘’*"
_STOPWORD_TEXT = (
    "a an and are as at be been but by can could do does for from had has have how i in "
    "into is it its me my of on or our please should so than that the their them then "
    "there these they this those to was we were what when where which while who why will "
    "with would you your about also just more most some such only very give write tell "
    "answer question following text below above using use make"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_BAD_LABELS = ("unsure", "maybe", "other")
_GOOD_LOGPROB_BASE = 0.02
_BAD_LOGPROB_MEAN = 1.5


@dataclass(frozen=True)
class Answer:
    """The model's full reply before any injected fault or max_tokens cut."""

    content: str
    kind: str
    bad: bool
    variant: str
    """"good", or which bad variant was produced (e.g. "truncated", "missing_colon")."""
    seed: int


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


def answer_seed(model: str, messages: list[dict[str, str]], response_format: Any) -> int:
    """sha256(model + NUL + canonical_json(messages) + canonical_json(response_format)).

    ``messages`` must already be normalised to ``{"role", "content": str}`` so the same
    prompt sent as a string or as content parts (or via the Anthropic endpoint, with the
    system prompt as a leading system message) gets the same answer.
    """
    key = model + "\0" + canonical_json(messages) + canonical_json(response_format)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest(), "big")


def prompt_of(messages: list[dict[str, str]]) -> tuple[str, str]:
    """(last user message text, all system text): what the answer is derived from."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    prompt = users[-1] if users else (messages[-1]["content"] if messages else "")
    system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer"))
    return prompt, system


def infer_kind(prompt: str, system: str, response_format: Any) -> str:
    """Which of KINDS a request asks for; the order of the checks is the precedence."""
    if isinstance(response_format, dict) and response_format.get("type") in (
        "json_schema", "json_object"
    ):
        return "json"
    text = f"{system}\n{prompt}"
    if _choice_labels(text):
        return "choices"
    if _SUMMARY_RE.search(text):
        return "summary"
    lower = text.lower()
    if "python" in lower and any(w in lower for w in ("function", "code", "script")):
        return "code"
    # The example files' phrasings are above, unchanged; below, how people ask in words.
    if natural.asks_for_json(text):
        return "json"
    if natural.asks_for_code(text):
        return "code"
    if natural.labels(text):
        return "choices"
    if natural.summary_limit(text) is not None:
        return "summary"
    if natural.list_count(text) is not None:
        return "list"
    return "text"


def generate_answer(model: str, messages: list[dict[str, str]], response_format: Any,
                    fail_rate: float, fail_rates: Mapping[str, float] | None = None) -> Answer:
    """The deterministic answer of ``model`` to this request.

    The first draw of the per-request RNG decides good/bad, so raising or lowering
    ``fail_rate`` at runtime flips only the prompts near the threshold. ``fail_rates``
    (answer kind -> rate) overrides ``fail_rate`` for the kinds it names.
    """
    seed = answer_seed(model, messages, response_format)
    rng = random.Random(seed)
    prompt, system = prompt_of(messages)
    kind = infer_kind(prompt, system, response_format)
    bad = rng.random() < (fail_rates or {}).get(kind, fail_rate)
    if kind == "json" and not isinstance(response_format, dict):
        content, variant = natural.json_answer(rng, bad, prompt)
    elif kind == "json":
        content, variant = _json_answer(rng, bad, prompt, response_format)
    elif kind == "choices":
        content, variant = _choices_answer(rng, bad, f"{system}\n{prompt}")
    elif kind == "summary":
        content, variant = _summary_answer(rng, bad, prompt, system)
    elif kind == "code":
        content, variant = _code_answer(rng, bad, prompt)
    elif kind == "list":
        content, variant = natural.list_answer(rng, bad, prompt, _keywords(prompt))
    else:
        content, variant = ("", "empty") if bad else (_sentence(rng, prompt), "good")
    return Answer(content=content, kind=kind, bad=bad, variant=variant, seed=seed)


def logprobs_for(answer: Answer, n_tokens: int, fail_rate: float) -> list[float]:
    """Per-token logprobs: near 0 for good answers (a bit lower on flakier tiers), around
    -1.5 for bad ones, so confidence-based validators can tell them apart."""
    rng = random.Random(answer.seed ^ 0x10C9)
    mean = _BAD_LOGPROB_MEAN if answer.bad else _GOOD_LOGPROB_BASE + 0.1 * fail_rate
    return [-round(min(rng.expovariate(1.0 / mean), 20.0), 6) for _ in range(n_tokens)]


# --- words -----------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _keywords(text: str) -> list[str]:
    """Distinct content words in order of appearance, as first written."""
    seen: dict[str, str] = {}
    for word in _words(text):
        w = word.lower()
        if len(w) >= 4 and w not in _STOPWORDS:
            seen.setdefault(w, word)
    return list(seen.values())


def _sentence(rng: random.Random, prompt: str) -> str:
    keys = _keywords(prompt)
    if len(keys) > 3:
        keys = [keys[i] for i in sorted(rng.sample(range(len(keys)), 3))]
    if not keys:
        return "Here is a short, direct answer to your request."
    topic = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    template = rng.choice((
        "In short, the answer concerns {topic}.",
        "The key points are {topic}.",
        "Briefly: it comes down to {topic}.",
    ))
    return template.format(topic=topic)


# --- choices ---------------------------------------------------------------------------


def _choice_labels(text: str) -> list[str]:
    head = _CHOICES_HEAD_RE.search(text)
    if head is None:
        return []
    rest = text[head.end():]
    if rest.lstrip(" \t").startswith("\n"):
        # "Answer with one of:\n- positive\n- negative" (a bulleted list)
        bullets = []
        for line in rest.lstrip(" \t")[1:].splitlines():
            stripped = line.strip()
            if not stripped.startswith(("-", "*", "•")):
                break
            bullets.append(stripped.lstrip("-*• ").strip().strip(_QUOTES).strip())
        bullets = [b for b in bullets if any(ch.isalnum() for ch in b)]
        if bullets:
            return bullets
    m = _CHOICES_RE.search(text)
    if m is None:
        return []
    group = m.group(1)
    if ":" in group:  # "answer with one of the following: a, b"
        group = group.rsplit(":", 1)[1]
    labels = [part.strip().strip(_QUOTES).strip() for part in _LABEL_SPLIT_RE.split(group)]
    return [label for label in labels if any(ch.isalnum() for ch in label)]


def _choices_answer(rng: random.Random, bad: bool, text: str) -> tuple[str, str]:
    labels = _choice_labels(text) or natural.labels(text)
    if not bad:
        expected = _EXPECTED_RE.search(text)
        if expected:
            want = expected.group(1).strip().strip(_QUOTES).strip()
            for label in labels:
                if label.lower() == want.lower():
                    return label, "good"
            return want, "good"
        return rng.choice(labels), "good"
    known = {label.lower() for label in labels}
    off_labels = [w for w in _BAD_LABELS if w not in known]
    if off_labels and rng.random() < 0.5:
        return rng.choice(off_labels), "off_label"
    return f"I think the answer is probably {rng.choice(labels)}.", "sentence"


# --- summary ---------------------------------------------------------------------------


def _summary_source(prompt: str, system: str) -> str:
    m = _SUMMARY_RE.search(prompt)
    if m is None:  # the instruction was in the system prompt: the user message is the text
        return prompt
    after = prompt[m.end():].lstrip(" \t:.-")
    if _words(after):
        return after
    # "<text>\n\nSummarise the above in at most N words." – drop the instruction sentence.
    before = prompt[:m.start()]
    cut = max(before.rfind("\n"), before.rfind(". "))
    return before[:cut + 1] if cut >= 0 else before


def _summary_answer(rng: random.Random, bad: bool, prompt: str,
                    system: str) -> tuple[str, str]:
    m = _SUMMARY_RE.search(f"{system}\n{prompt}")
    if m is None:  # asked in words: "Summarize in one sentence", "TL;DR", "in 20 words"
        limit = natural.summary_limit(f"{system}\n{prompt}") or 30
        head, sep, rest = prompt.strip().partition("\n")
        if not sep:
            head, sep, rest = prompt.partition(":")
        body = rest if sep and _words(rest) else prompt
        source_words = [_words(s) for s in _SENTENCE_SPLIT_RE.split(body)
                        if not natural.is_instruction(s)]
        return natural.one_sentence_answer(rng, bad, [w for w in source_words if w], limit)
    limit = max(1, int(m.group(1)))
    source = _summary_source(prompt, system)
    sentences = [_words(s) for s in _SENTENCE_SPLIT_RE.split(source)]
    sentences = [s for s in sentences if s] or [_words(prompt) or ["Summary"]]
    if bad:
        target = rng.randint(math.ceil(1.5 * limit), 3 * limit)
        pool = [w for s in sentences for w in s]
        words = [pool[i % len(pool)] for i in range(target)]
        variant = "too_long"
    else:
        target = rng.randint(math.ceil(limit / 2), limit)
        per_sentence = rng.randint(2, 4)
        words = []
        for sentence in sentences:
            words.extend(sentence[:per_sentence])
            if len(words) >= target:
                break
        words = words[:target]
        variant = "good"
    text = " ".join(words)
    return text[:1].upper() + text[1:] + ".", variant


# --- code ------------------------------------------------------------------------------

# (prompt pattern, default function name, parameters, body lines ending in a return)
_CODE_TEMPLATES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    (r"\bpalindrom", "is_palindrome", "text: str", (
        'cleaned = "".join(ch.lower() for ch in text if ch.isalnum())',
        "return cleaned == cleaned[::-1]",
    )),
    (r"\brevers", "reverse_string", "text: str", ("return text[::-1]",)),
    (r"\bfibonacci", "fibonacci", "n: int", (
        "a, b = 0, 1",
        "for _ in range(n):",
        "    a, b = b, a + b",
        "return a",
    )),
    (r"\bfactorial", "factorial", "n: int", (
        "result = 1",
        "for i in range(2, n + 1):",
        "    result *= i",
        "return result",
    )),
    (r"\bprimes?\b", "is_prime", "n: int", (
        "if n < 2:",
        "    return False",
        "for i in range(2, int(n ** 0.5) + 1):",
        "    if n % i == 0:",
        "        return False",
        "return True",
    )),
    (r"\bvowels?\b", "count_vowels", "text: str", (
        'return sum(1 for ch in text.lower() if ch in "aeiou")',
    )),
    (r"\bduplicat|\bunique", "unique_items", "items: list", (
        "seen = set()",
        "result = []",
        "for item in items:",
        "    if item not in seen:",
        "        seen.add(item)",
        "        result.append(item)",
        "return result",
    )),
    (r"\bsort", "sort_items", "items: list", ("return sorted(items)",)),
    (r"\b(?:largest|maximum|max)\b", "largest", "values: list[float]", (
        "return max(values)",
    )),
    (r"\b(?:smallest|minimum|min)\b", "smallest", "values: list[float]", (
        "return min(values)",
    )),
    (r"\b(?:sum|total)\b", "total", "values: list[float]", (
        "total = 0.0",
        "for value in values:",
        "    total += value",
        "return total",
    )),
    (r"\bwords?\b", "count_words", "text: str", ("return len(text.split())",)),
)
_DEFAULT_CODE: tuple[str, str, tuple[str, ...]] = ("solve", "*args, **kwargs", (
    "result = list(args) + list(kwargs.values())",
    "return result",
))
_NAME_AFTER_RE = re.compile(r"\b(?:called|named)\s+`?([A-Za-z_]\w*)")
_NAME_TICKS_RE = re.compile(r"`([A-Za-z_]\w*)(?:\(\))?`")


def _function_name(prompt: str, fallback: str) -> str:
    for pattern in (_NAME_AFTER_RE, _NAME_TICKS_RE):
        for m in pattern.finditer(prompt):
            name = m.group(1)
            if not keyword.iskeyword(name) and name.lower() not in ("python", "def"):
                return name
    return fallback


def _code_answer(rng: random.Random, bad: bool, prompt: str) -> tuple[str, str]:
    name, params, body = _DEFAULT_CODE
    lower = prompt.lower()
    for pattern, t_name, t_params, t_body in _CODE_TEMPLATES:
        if re.search(pattern, lower):
            name, params, body = t_name, t_params, t_body
            break
    name = _function_name(prompt, name)
    doc = " ".join(_words(prompt)[:12]) or "Solve the task"
    lines = [f"def {name}({params}):", f'    """{doc[:1].upper() + doc[1:]}."""']
    lines += ["    " + line for line in body]
    variant = "good"
    if bad:
        variant = rng.choice(("missing_colon", "unbalanced_paren", "bad_indent"))
        if variant == "missing_colon":
            lines[0] = lines[0].removesuffix(":")
        elif variant == "unbalanced_paren":
            lines[-1] = lines[-1].replace("return ", "return (", 1)
        else:
            lines = [lines[0]] + [line.strip() for line in lines[1:]]
    code = "\n".join(lines)
    return f"```python\n{code}\n```", variant


# --- json ------------------------------------------------------------------------------

_FORMATS = {
    "date": "2024-05-01",
    "date-time": "2024-05-01T12:00:00Z",
    "time": "12:00:00",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "iri": "https://example.com/",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "duration": "P1D",
}
_MAX_DEPTH = 6
_NEXT_FIELD_RE = re.compile(r"[,;.][ \t]*[A-Za-z][\w ]{0,30}[:=]")


class _JsonFaker:
    """Builds a value that validates against a JSON schema (the common subset that
    structured-output APIs accept: objects, arrays, scalars, enum/const, $ref, anyOf)."""

    def __init__(self, rng: random.Random, root: Any, prompt: str) -> None:
        self.rng = rng
        self.root = root
        self.prompt = prompt
        self.words = _words(prompt)

    def resolve(self, schema: Any) -> Any:
        for _ in range(16):
            if not isinstance(schema, dict) or not isinstance(schema.get("$ref"), str):
                return schema
            target = self._pointer(schema["$ref"])
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **siblings} if isinstance(target, dict) else siblings
        return schema

    def _pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def types(self, schema: Any) -> list[str]:
        schema = self.resolve(schema)
        if not isinstance(schema, dict):
            return []
        typ = schema.get("type")
        if isinstance(typ, str):
            return [typ]
        if isinstance(typ, list):
            return [t for t in typ if isinstance(t, str)]
        return []

    def value(self, schema: Any, name: str = "", depth: int = 0) -> Any:
        schema = self.resolve(schema)
        if not isinstance(schema, dict):
            return self.phrase()
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if self.types(o) != ["null"]]
                return self.value((non_null or options)[0], name, depth)
        if isinstance(schema.get("allOf"), list):
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part)
                if isinstance(part, dict):
                    props = {**merged.get("properties", {}), **part.get("properties", {})}
                    required = list(merged.get("required", [])) + list(part.get("required", []))
                    merged = {**merged, **part, "properties": props, "required": required}
            return self.value(merged, name, depth)
        types = [t for t in self.types(schema) if t != "null"]
        if not types and "null" in self.types(schema):
            return None
        typ = types[0] if types else (
            "object" if "properties" in schema or "required" in schema
            else "array" if "items" in schema or "prefixItems" in schema
            else "string"
        )
        if typ == "object":
            return self.object(schema, depth)
        if typ == "array":
            return self.array(schema, depth)
        if typ == "integer":
            return self.integer(schema, name)
        if typ == "number":
            return self.number(schema)
        if typ == "boolean":
            return self.rng.random() < 0.5
        return self.string(schema, name)

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props = schema.get("properties") or {}
        required = [r for r in schema.get("required", []) if isinstance(r, str)]
        keys = list(props) + [r for r in required if r not in props]
        if not keys:
            extra = schema.get("additionalProperties", True)
            if extra is False or depth >= _MAX_DEPTH:
                return {}
            value_schema = extra if isinstance(extra, dict) else {"type": "string"}
            return {"note": self.value(value_schema, "note", depth + 1)}
        return {
            key: self.value(props.get(key, {}), key, depth + 1)
            for key in keys
            if depth < _MAX_DEPTH or key in required
        }

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", max(3, low)))
        raw_prefix = schema.get("prefixItems")
        prefix: list[Any] = raw_prefix if isinstance(raw_prefix, list) else []
        items = schema.get("items", {})
        if items is False:
            return [self.value(p, "", depth + 1) for p in prefix]
        count = low if depth >= _MAX_DEPTH else min(max(self.rng.randint(1, 3), low), high)
        out = [self.value(p, "", depth + 1) for p in prefix[:count]]
        seen = {canonical_json(v) for v in out}
        attempts = 0
        while len(out) < count and attempts < 4 * count + 4:
            attempts += 1
            value = self.value(items, "", depth + 1)
            if schema.get("uniqueItems") and canonical_json(value) in seen:
                continue
            seen.add(canonical_json(value))
            out.append(value)
        return out

    def _bounds(self, schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        low, low_excl = schema.get("minimum"), False
        high, high_excl = schema.get("maximum"), False
        ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if ex_low is True:  # draft 4: a flag on "minimum"
            low_excl = True
        elif isinstance(ex_low, int | float) and (low is None or ex_low >= low):
            low, low_excl = ex_low, True
        if ex_high is True:
            high_excl = True
        elif isinstance(ex_high, int | float) and (high is None or ex_high <= high):
            high, high_excl = ex_high, True
        return low, low_excl, high, high_excl

    def integer(self, schema: dict[str, Any], name: str) -> int:
        low_b, low_excl, high_b, high_excl = self._bounds(schema)
        low = None if low_b is None else (
            math.floor(low_b) + 1 if low_excl else math.ceil(low_b))
        high = None if high_b is None else (
            math.ceil(high_b) - 1 if high_excl else math.floor(high_b))
        if low is None and high is None:
            low, high = 1, 100
        elif high is None:
            assert low is not None
            high = low + 100
        elif low is None:
            low = high - 100
        if low > high:
            return low
        found = re.match(r"-?\d[\d,]*", self.field_value(name) or "")
        if found is not None:
            number = int(found.group().replace(",", ""))
            if low <= number <= high:
                return number
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            start = math.ceil(low / step) * step
            if start <= high:
                return self.rng.randrange(start, high + 1, step)
        return self.rng.randint(low, high)

    def number(self, schema: dict[str, Any]) -> float:
        low_b, low_excl, high_b, high_excl = self._bounds(schema)
        low = 0.0 if low_b is None else float(low_b)
        high = (low + 100.0) if high_b is None else float(high_b)
        if low_b is None and high_b is not None:
            low = high - 100.0

        def ok(x: float) -> bool:
            return (x > low if low_excl else x >= low) and (x < high if high_excl else x <= high)

        step = schema.get("multipleOf")
        if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
            # Validators test (value / step).is_integer() in floating point, so only
            # multiples that survive the round trip are acceptable.
            first, last = math.ceil(low / step), math.floor(high / step)
            for k in [self.rng.randint(first, last) for _ in range(8)] if first <= last else []:
                candidate = k * step
                if ok(candidate) and (candidate / step).is_integer():
                    return candidate
        value = round(self.rng.uniform(low, high), 2)
        return value if ok(value) else (low + high) / 2

    def string(self, schema: dict[str, Any], name: str) -> str:
        fmt = schema.get("format")
        if fmt == "uuid":
            text = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        elif isinstance(fmt, str) and fmt in _FORMATS:
            text = _FORMATS[fmt]
        else:
            text = self.field_value(name) or self.phrase()
        min_len = int(schema.get("minLength", 0))
        max_len = schema.get("maxLength")
        while len(text) < min_len:
            text = f"{text} {self.phrase()}".strip()
        if isinstance(max_len, int):
            text = text[:max_len]
        return text

    def field_value(self, name: str) -> str | None:
        """``Name: value`` lines in the prompt: an extraction task's answer is in the text."""
        parts = [p for p in re.split(r"[_\W]+|(?<=[a-z])(?=[A-Z])", name) if p]
        if not parts:
            return None
        label = r"[ _-]?".join(re.escape(p) for p in parts)
        m = re.search(rf"(?:^|[.;,][ \t]+)[ \t\-*]*{label}[ \t]*[:=][ \t]*([^\n]+)",
                      self.prompt, re.M | re.I)
        if m is None:
            return None
        value = _NEXT_FIELD_RE.split(m.group(1), maxsplit=1)[0]
        return value.strip().rstrip(".").strip().strip(_QUOTES).strip() or None

    def phrase(self) -> str:
        if not self.words:
            return "value"
        start = self.rng.randrange(len(self.words))
        return " ".join(self.words[start:start + self.rng.randint(1, 3)])


def _json_answer(rng: random.Random, bad: bool, prompt: str,
                 response_format: dict[str, Any]) -> tuple[str, str]:
    schema: Any = None
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
    faker = _JsonFaker(rng, schema, prompt)
    if isinstance(schema, dict):
        value = faker.value(schema)
    else:
        keys = _keywords(prompt)
        value = {"answer": _sentence(rng, prompt), "topic": keys[0] if keys else "general"}
    if not bad:
        return json.dumps(value, ensure_ascii=False), "good"

    variants = ["truncated", "prose"]
    root = faker.resolve(schema) if isinstance(schema, dict) else None
    required: list[str] = []
    typed: list[str] = []
    if isinstance(value, dict) and isinstance(root, dict):
        required = [k for k in root.get("required", []) if k in value]
        props = root.get("properties") or {}
        typed = [k for k in value if k in props and _wrong_value(faker, props[k]) is not None]
        variants += ["missing_field"] * bool(required) + ["wrong_type"] * bool(typed)
    variant = rng.choice(variants)
    if variant == "missing_field":
        assert isinstance(value, dict)
        del value[rng.choice(required)]
        return json.dumps(value, ensure_ascii=False), variant
    if variant == "wrong_type":
        assert isinstance(value, dict) and isinstance(root, dict)
        key = rng.choice(typed)
        value[key] = _wrong_value(faker, root["properties"][key])
        return json.dumps(value, ensure_ascii=False), variant
    text = json.dumps(value, ensure_ascii=False)
    if variant == "prose":
        return f"Here is the JSON:\n{text}", variant
    cut = text[:max(1, len(text) // 2)]
    if _parses(cut):  # a short scalar can survive being halved
        cut += ","
    return cut, variant


_JSON_TYPES: tuple[tuple[str, Any], ...] = (
    ("integer", 12345), ("string", "twelve"), ("boolean", True), ("array", ["n/a"]),
)


def _wrong_value(faker: _JsonFaker, schema: Any) -> Any:
    """A value of a JSON type the property does not allow, or None if any type is fine."""
    resolved = faker.resolve(schema)
    if not isinstance(resolved, dict):
        return None
    allowed = set(faker.types(resolved))
    if "number" in allowed:
        allowed.add("integer")
    if isinstance(resolved.get("enum"), list) and not allowed:
        enum = resolved["enum"]
        return "__not_an_option__" if "__not_an_option__" not in enum else None
    if not allowed:
        return None
    for typ, candidate in _JSON_TYPES:
        if typ not in allowed:
            return candidate
    return None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True

