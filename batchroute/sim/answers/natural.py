"""How people actually ask: labels, yes/no, JSON, lists, one-sentence summaries, code.

The example batches phrase every task the same way ("Answer with one of: a, b, c.",
"in at most N words", a ``response_format``). People write "Classify the sentiment of
this review as positive, negative or neutral", "Is this spam? Answer yes or no",
"Extract the invoice number and total as JSON", "List three ...", "Summarize in one
sentence". Without this module the simulator answered all of those with a generic
sentence, so a batch of naturally worded requests failed its checks at every tier and
cost many times its baseline: a newcomer's first run looked like batchroute was broken.

Everything here is a pure function of the prompt text (plus the caller's RNG), so the
simulator stays deterministic per (model, prompt). It is consulted only after the
example batches' own phrasings, so their answers (and every benchmark figure built on
them) are unchanged.
"""

from __future__ import annotations

import json
import random
import re

# --- labels and yes/no -----------------------------------------------------------------

_ITEM = r"[\"'`“‘]?[A-Za-z][A-Za-z0-9_-]*[\"'`”’]?"
_SEP = r"(?:\s*,\s*or\s+|\s*,\s*|\s*/\s*|\s*\|\s*|\s+or\s+)"
_LIST = rf"({_ITEM}(?:{_SEP}{_ITEM}){{1,7}})"
_ANCHOR = (r"(?:\bas(?:\s+either)?|\binto|\bone\s+of|\bfrom|\beither|\bwith|\banswer(?:\s+only)?"
           r"|\breply(?:\s+only)?|\brespond(?:\s+only)?|\boutput|\breturn|\bsay"
           r"|\blabels?|\bcategor(?:y|ies)|\boptions?|\bchoices?|\bpick|\bchoose"
           r"|\(|\bis\s+it)")
_LABELS_RE = re.compile(rf"{_ANCHOR}\s*(?:(?:only|just|exactly|the\s+word)\s+)?:?\s*{_LIST}"
                        r"(?=\s*(?:[.?!:;)\n]|$|\s+(?:based|according|depending|only|for|"
                        r"and\s+nothing|without|no\s+other)))",
                        re.I)
_YES_NO_RE = re.compile(r"\b(?:yes\s*(?:or|/)\s*no|true\s*(?:or|/)\s*false)\b", re.I)
_NOT_LABEL_TEXT = ("the this that it json csv yaml text words word one two three sentence "
                   "sentences list bullet bullets paragraph markdown python code function")
_NOT_LABELS = frozenset(_NOT_LABEL_TEXT.split())
_QUOTE_CHARS = "\"'`“”‘’"
# Words that introduce choices only when the prompt is about choosing ("Translate this
# into Spanish or French" is not a label set; "Categorize this into billing or bugs" is).
_WEAK_ANCHORS = ("as", "into", "from", "with", "return", "output", "say")
_CHOOSING_RE = re.compile(
    r"classif|categor|label|sentiment|\btag\b|\bsort\b|\brate\b|priorit|urgen|spam|"
    r"\bwhich\b|\bwhether\b|\bdecide|\bchoose|\bpick|\bdetect|\bdetermine|\bis\s+(?:it|this)\b",
    re.I)


def labels(text: str) -> list[str]:
    """The closed set of answers a prompt asks for, as written; [] if it asks for none.

    Looks for a short list of single words after a word that introduces choices
    ("as positive, negative or neutral", "Label: A, B or C", "(yes/no)", "Answer yes
    or no"). A list containing format words ("as JSON or YAML") is not a label set.
    """
    for m in _LABELS_RE.finditer(text):
        items = [i.strip(_QUOTE_CHARS) for i in re.split(_SEP, m.group(1))]
        items = [i for i in items if i]
        if len(items) < 2 or any(i.lower() in _NOT_LABELS for i in items):
            continue
        if len({i.lower() for i in items}) != len(items):
            continue
        anchor = m.group(0)[:m.start(1) - m.start(0)].strip(" :(").lower().split()
        if anchor and anchor[0] in _WEAK_ANCHORS and not _CHOOSING_RE.search(text):
            continue
        return items
    yn = _YES_NO_RE.search(text)
    if yn:
        return ["yes", "no"] if yn.group(0).lower().startswith("y") else ["true", "false"]
    return []


# --- JSON asked for in words -----------------------------------------------------------

_JSON_ASK_RE = re.compile(
    r"\b(?:as|in|into|return|output|respond\s+with|reply\s+with|give\s+me|produce)\s+"
    r"(?:a\s+|an\s+|valid\s+|only\s+|strict\s+|plain\s+)*json\b|\bjson\s+(?:object|format)\b",
    re.I)
_FIELDS_RE = re.compile(
    r"\b(?:extract|return|get|pull\s+out|find|give\s+me|list|identify|with\s+(?:the\s+)?"
    r"(?:keys?|fields?|properties))\s*:?\s+(?:the\s+)?(.+?)"
    r"(?=\s+(?:as|in|into|from|of\s+(?:this|the)|to)\s+(?:a\s+|an\s+|valid\s+)*json\b|\s+from\b|"
    r"[.:;\n]|\s+as\b|$)", re.I)
_JSON_WITH_RE = re.compile(
    r"\bjson(?:\s+object|\s+format)?\s+with\s+(?:the\s+)?(?:(?:keys?|fields?|properties)\s+)?"
    r":?\s*(.+?)(?=[.:;\n]|\s+(?:mentioned|from|for|in|of)\b|$)", re.I)
_FIELD_SPLIT_RE = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+|\s*/\s*", re.I)
_QUOTED_KEY_RE = re.compile(r"[\"`']([A-Za-z_][A-Za-z0-9_ ]{0,30})[\"`']")
_MONEY_RE = re.compile(r"[$€£]\s?\d[\d,]*(?:\.\d+)?|\d[\d,]*(?:\.\d+)?\s?(?:USD|EUR|GBP)\b")
_NUMBER_RE = re.compile(r"\b\d+(?:\.\d+)?\b")
_ID_RE = re.compile(r"\b(?=[A-Z0-9#-]*\d)[A-Z#][A-Z0-9]*(?:-[A-Z0-9]+)+\b|#\s?\d+\b")
_DATE_RE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|"
                      r"Nov|Dec)[a-z]*\.? \d{1,2},? \d{4}\b|\b\d{1,2}/\d{1,2}/\d{2,4}\b")
_EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")
_PHONE_RE = re.compile(r"\+?\d[\d\s().-]{7,}\d")
_NAME_RE = re.compile(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b")


def asks_for_json(text: str) -> bool:
    """True when the prompt asks for JSON in words, without a ``response_format``."""
    return bool(_JSON_ASK_RE.search(text))


def json_fields(prompt: str) -> list[str]:
    """snake_case keys the prompt names ("the invoice number and total" → invoice_number,
    total); quoted keys win. Empty when it names none."""
    quoted = [q.strip() for q in _QUOTED_KEY_RE.findall(prompt)]
    if len(quoted) >= 2:
        return list(dict.fromkeys(_snake(q) for q in quoted))
    m = _JSON_WITH_RE.search(prompt) or _FIELDS_RE.search(prompt)
    if m is None:
        return []
    parts = [p for p in _FIELD_SPLIT_RE.split(m.group(1)) if p]
    keys = []
    for part in parts:
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z0-9']*", part)
                 if w.lower() not in ("the", "a", "an", "its", "their", "his", "her", "all")]
        words = [w.removesuffix("'s") for w in words]
        if 0 < len(words) <= 4:
            keys.append(_snake(" ".join(words)))
    return list(dict.fromkeys(keys))


def _snake(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "value"


def _field_value(key: str, prompt: str, rng: random.Random) -> object:
    """A plausible value for ``key``, taken from the prompt when it holds one."""
    k = key.lower()

    def find(regex: re.Pattern[str]) -> str | None:
        m = regex.search(prompt)
        return m.group(0).strip() if m else None

    if "email" in k:
        return find(_EMAIL_RE) or "user@example.com"
    if "phone" in k:
        return find(_PHONE_RE)
    if "date" in k or k.endswith("_on") or k in ("due", "deadline"):
        return find(_DATE_RE) or "2024-05-01"
    if any(w in k for w in ("total", "amount", "price", "cost", "sum", "balance", "fee")):
        money = find(_MONEY_RE)
        if money:
            return float(re.sub(r"[^\d.]", "", money.replace(",", "")) or 0)
        return round(rng.uniform(10, 500), 2)
    if any(w in k for w in ("number", "id", "no", "ref", "code")):
        return find(_ID_RE) or find(_NUMBER_RE) or f"{rng.randint(1000, 9999)}"
    if any(w in k for w in ("count", "quantity", "qty", "age", "year")):
        n = find(_NUMBER_RE)
        return int(float(n)) if n else rng.randint(1, 20)
    if "name" in k or k in ("customer", "sender", "author", "person", "vendor"):
        return find(_NAME_RE) or "Alex Morgan"
    words = [w for w in re.findall(r"[A-Za-z]{4,}", prompt)]
    if not words:
        return "n/a"
    start = rng.randrange(len(words))
    return " ".join(words[start:start + rng.randint(1, 3)])


def json_value(prompt: str, rng: random.Random) -> dict[str, object]:
    """The object a prompt asking for JSON in words gets: its named fields, filled in."""
    keys = json_fields(prompt) or ["answer"]
    return {key: _field_value(key, prompt, rng) for key in keys[:12]}


def json_answer(rng: random.Random, bad: bool, prompt: str) -> tuple[str, str]:
    text = json.dumps(json_value(prompt, rng), ensure_ascii=False)
    if not bad:
        return text, "good"
    if rng.random() < 0.5:
        return f"Sure! Here is the JSON you asked for:\n{text}", "prose"
    return text[:max(1, len(text) // 2)], "truncated"


# --- lists -----------------------------------------------------------------------------

_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
            "nine": 9, "ten": 10}
_LIST_RE = re.compile(
    r"\b(?:list|name|give(?:\s+me)?|suggest|provide|write|brainstorm|come\s+up\s+with)\s+"
    r"(?:(?:exactly|at\s+least|up\s+to|the|top)\s+)?(\d{1,2}|two|three|four|five|six|seven|"
    r"eight|nine|ten)\b(?!\s*(?:words|sentences?|characters|lines?|paragraphs?)\b)"
    r"|\b(?:bullet(?:ed)?\s+(?:list|points)|as\s+a\s+list|a\s+list\s+of)\b", re.I)


def list_count(text: str) -> int | None:
    """How many items a "List three ..." / "Give me 5 ..." prompt wants (3 if unsaid);
    None when it asks for no list."""
    m = _LIST_RE.search(text)
    if m is None:
        return None
    n = m.group(1)
    if n is None:
        return 3
    count = int(n) if n.isdigit() else _NUMBERS[n.lower()]
    return max(1, min(count, 20))


def list_answer(rng: random.Random, bad: bool, prompt: str,
                keywords: list[str]) -> tuple[str, str]:
    n = list_count(prompt) or 3
    if bad:
        n = max(1, n - 1) if n > 1 else 2
    words = keywords or ["point"]
    lines = []
    for i in range(n):
        word = words[(i + rng.randrange(len(words))) % len(words)]
        lines.append(f"{i + 1}. " + rng.choice((
            f"Consider the {word.lower()} first.", f"Check the {word.lower()} carefully.",
            f"Keep the {word.lower()} simple.", f"Review how the {word.lower()} is handled.")))
    return "\n".join(lines), "good" if not bad else "wrong_count"


# --- one-sentence summaries ------------------------------------------------------------

_ONE_SENTENCE_RE = re.compile(
    r"\b(?:in|as|into|with|using)\s+(?:one|a\s+single|a|1)\s+(?:short\s+)?(?:sentence|line)\b"
    r"|\bone[- ](?:sentence|line)\s+summary\b|\btl;?\s?dr\b", re.I)
_SUMMARY_WORDS_RE = re.compile(r"\b(?:summari[sz]e|summary|sum\s+up|gist|tl;?\s?dr)\b", re.I)
_WORD_LIMIT_RE = re.compile(
    r"\b(?:in|under|within|at\s+most|no\s+more\s+than|max(?:imum)?(?:\s+of)?|up\s+to)\s+"
    r"(\d{1,3})\s+words\b", re.I)


def is_instruction(sentence: str) -> bool:
    """True for the sentence of a prompt that asks for the summary (not part of the text)."""
    return bool(_SUMMARY_WORDS_RE.search(sentence) or _ONE_SENTENCE_RE.search(sentence))


def summary_limit(text: str) -> int | None:
    """The word limit of a summary request ("in one sentence": 25), None if not one."""
    m = _WORD_LIMIT_RE.search(text)
    if m and _SUMMARY_WORDS_RE.search(text):
        return max(3, int(m.group(1)))
    if _ONE_SENTENCE_RE.search(text):
        return 25
    if _SUMMARY_WORDS_RE.search(text):
        return 40
    return None


def one_sentence_answer(rng: random.Random, bad: bool, source_words: list[list[str]],
                        limit: int) -> tuple[str, str]:
    """One sentence of at most ``limit`` words built from the text; bad: three rambling ones."""
    pool = [w for s in source_words for w in s] or ["The", "text", "is", "short"]
    if bad:
        chunks = [" ".join(pool[i % len(pool)] for i in range(j, j + limit)) for j in (0, 3, 6)]
        return ". ".join(c[:1].upper() + c[1:] for c in chunks) + ".", "too_long"
    target = rng.randint(max(3, limit // 2), limit)
    words: list[str] = []
    per = rng.randint(3, 5)
    for sentence in source_words:
        words.extend(sentence[:per])
        if len(words) >= target:
            break
    words = (words or pool)[:target]
    text = " ".join(words)
    return text[:1].upper() + text[1:] + ".", "good"


# --- code ------------------------------------------------------------------------------

_CODE_RE = re.compile(
    r"\b(?:write|implement|create|give\s+me|code|define)\b[^.?!\n]{0,40}?\b(?:function|method|"
    r"script|snippet|program|class|one-liner|def)\b|\bin\s+python\b|\bpython\s+(?:code|"
    r"function|snippet|script)\b", re.I)


def asks_for_code(text: str) -> bool:
    """True for "Write a function that ...", "Python snippet to ...", "in Python" and kin."""
    return bool(_CODE_RE.search(text))
