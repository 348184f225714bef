"""The simulator answers requests phrased the way people write them (issue #17).

Each phrasing below is written as a user would, not as the example batches do. A good
answer (fail rate 0) must pass the check a user would put on it; a bad one (fail rate 1)
must fail it, so escalation still has something to catch.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from batchroute.sim.answers import generate_answer, infer_kind
from batchroute.sim.answers.natural import json_fields, labels, list_count, summary_limit

REVIEW = "The headphones broke after two days and support never answered my emails."


def ask(prompt: str, bad: bool = False, system: str | None = None, model: str = "m") -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    return generate_answer(model, msgs, None, fail_rate=1.0 if bad else 0.0).content


LABEL_PROMPTS: list[tuple[str, list[str]]] = [
    (f"Classify the sentiment of this review as positive, negative or neutral.\n\n{REVIEW}",
     ["positive", "negative", "neutral"]),
    (f"Classify the sentiment of this review as positive, negative, or neutral: {REVIEW}",
     ["positive", "negative", "neutral"]),
    ("Is this spam? Answer yes or no.\n\nWIN A FREE CRUISE!!! Click here now",
     ["yes", "no"]),
    ("Label: A, B or C.\nWhich option best describes a refund request? A) billing "
     "B) shipping C) other", ["A", "B", "C"]),
    ("Does the customer want a refund? Reply with yes or no only.\n\nI want my money back.",
     ["yes", "no"]),
    ("Is the following statement true or false? The sun rises in the west.",
     ["true", "false"]),
    ("Categorize this ticket into billing, shipping, technical or account.\n\n"
     "My card was charged twice.", ["billing", "shipping", "technical", "account"]),
    ("What is the priority of this email (low/medium/high)?\n\nServer is down!",
     ["low", "medium", "high"]),
    ("Tag the language of this text. Options: english, french, german.\n\nBonjour à tous",
     ["english", "french", "german"]),
    ("Sentiment? Respond with 'positive' or 'negative'.\n\nLoved it!",
     ["positive", "negative"]),
    ("Please classify the urgency as either urgent or routine based on the message: "
     "the payroll run failed", ["urgent", "routine"]),
    ("Is this message toxic (yes/no)? You are an idiot.", ["yes", "no"]),
    ("Choose one of: bug, feature, question. Title: App crashes when I tap save",
     ["bug", "feature", "question"]),
    ("Would you say this customer is happy? yes or no\n\nThanks, great service!",
     ["yes", "no"]),
]


@pytest.mark.parametrize(("prompt", "want"), LABEL_PROMPTS)
def test_label_requests_get_one_of_their_labels(prompt: str, want: list[str]) -> None:
    assert [w.lower() for w in labels(prompt)] == [w.lower() for w in want]
    assert infer_kind(prompt, "", None) == "choices"
    good = ask(prompt)
    assert good.lower() in {w.lower() for w in want}, good
    bads = {ask(prompt, bad=True, model=f"m{i}").lower() for i in range(6)}
    assert not bads & {w.lower() for w in want}, bads


JSON_PROMPTS: list[tuple[str, list[str]]] = [
    ("Extract the invoice number and total as JSON.\n\nInvoice INV-2024-0042\n"
     "Total due: $1,250.00 by 2024-06-30", ["invoice_number", "total"]),
    ("Return JSON with the keys \"name\", \"email\" and \"company\" for this signature: "
     "Maria Lopez, maria@acme.io, Acme Corp", ["name", "email", "company"]),
    ("Pull out the customer's name, order number and date. Respond with JSON only.\n\n"
     "Hi, this is Tom Baker, order #5531 placed on 2024-03-02.",
     ["customer_name", "order_number", "date"]),
    ("Give me a JSON object with the city and country mentioned here: I flew to Lyon.",
     ["city", "country"]),
    ("Output valid JSON: extract the product, quantity and price from 'Ordered 3 lamps at "
     "$20 each'", ["product", "quantity", "price"]),
    ("Convert this address to JSON format with street, city and zip: 1 Main St, Springfield "
     "12345", ["street", "city", "zip"]),
]


@pytest.mark.parametrize(("prompt", "keys"), JSON_PROMPTS)
def test_json_asked_for_in_words_is_plain_json_with_the_named_keys(
        prompt: str, keys: list[str]) -> None:
    assert infer_kind(prompt, "", None) == "json"
    assert json_fields(prompt) == keys
    value = json.loads(ask(prompt))
    assert list(value) == keys
    for i in range(4):
        with pytest.raises(ValueError):
            json.loads(ask(prompt, bad=True, model=f"m{i}"))


def test_json_values_come_from_the_text() -> None:
    value = json.loads(ask(JSON_PROMPTS[0][0]))
    assert value == {"invoice_number": "INV-2024-0042", "total": 1250.0}
    assert json.loads(ask(JSON_PROMPTS[1][0]))["email"] == "maria@acme.io"


LIST_PROMPTS: list[tuple[str, int]] = [
    ("List three ways to reduce customer churn.", 3),
    ("Give me 5 ideas for a team offsite.", 5),
    ("Name four benefits of unit testing", 4),
    ("Suggest two subject lines for a product launch email.", 2),
    ("What should I pack for a hiking trip? Answer as a bulleted list.", 3),
]


@pytest.mark.parametrize(("prompt", "n"), LIST_PROMPTS)
def test_lists_have_the_number_of_items_asked(prompt: str, n: int) -> None:
    assert list_count(prompt) == n
    assert infer_kind(prompt, "", None) == "list"
    lines = ask(prompt).splitlines()
    assert len(lines) == n and all(re.match(rf"{i + 1}\. \w", x) for i, x in enumerate(lines))
    assert len(ask(prompt, bad=True).splitlines()) != n


ARTICLE = ("The city council approved a new budget on Monday. Funding for parks rises by ten "
           "percent. Road repairs start in spring. Critics say schools were left out.")
SUMMARY_PROMPTS: list[tuple[str, int]] = [
    (f"Summarize in one sentence:\n\n{ARTICLE}", 25),
    (f"Summarise this in a single sentence. {ARTICLE}", 25),
    (f"TL;DR: {ARTICLE}", 25),
    (f"Can you give me a one-sentence summary of this?\n{ARTICLE}", 25),
    (f"Summarize the following in 15 words.\n{ARTICLE}", 15),
    (f"Sum up this text in under 20 words: {ARTICLE}", 20),
]


@pytest.mark.parametrize(("prompt", "limit"), SUMMARY_PROMPTS)
def test_one_sentence_summaries_are_one_sentence_within_the_limit(
        prompt: str, limit: int) -> None:
    assert summary_limit(prompt) == limit
    assert infer_kind(prompt, "", None) == "summary"
    good = ask(prompt)
    assert good.endswith(".") and good.count(".") == 1, good
    assert len(good.split()) <= limit
    assert "Summar" not in good and "TL" not in good
    bad = ask(prompt, bad=True)
    assert bad.count(".") > 1 or len(bad.split()) > limit


CODE_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a function that returns the factorial of n.",
    "Can you implement a function to count vowels in a string in Python?",
    "I need a quick snippet in python that removes duplicates from a list",
    "Create a function called `slugify` that turns a title into a URL slug.",
]


@pytest.mark.parametrize("prompt", CODE_PROMPTS)
def test_code_requests_get_python_that_parses(prompt: str) -> None:
    assert infer_kind(prompt, "", None) == "code"
    code = ask(prompt).removeprefix("```python\n").removesuffix("\n```")
    ast.parse(code)
    assert code.startswith("def ")
    with pytest.raises(SyntaxError):
        ast.parse(ask(prompt, bad=True).removeprefix("```python\n").removesuffix("\n```"))


def test_named_function_is_used() -> None:
    assert "def slugify(" in ask(CODE_PROMPTS[4])


def test_open_questions_stay_free_text() -> None:
    for prompt in ("What is the capital of France?", "Explain recursion to a child.",
                   "Translate 'good morning' into Spanish."):
        assert infer_kind(prompt, "", None) == "text"


def test_at_least_thirty_phrasings() -> None:
    total = (len(LABEL_PROMPTS) + len(JSON_PROMPTS) + len(LIST_PROMPTS)
             + len(SUMMARY_PROMPTS) + len(CODE_PROMPTS))
    assert total >= 30


def test_the_natural_example_batch_succeeds_with_savings(tmp_path: Path) -> None:
    from batchroute.config import load_config
    from batchroute.embedded import run_file
    from batchroute.store import Store, get_engine

    src = Path(__file__).resolve().parent.parent / "jobs" / "examples" / "natural_batch.jsonl"
    store = Store(get_engine(f"sqlite:///{tmp_path / 'n.db'}"))
    report = run_file(src, tmp_path / "out.jsonl", None, load_config(), store=store).report
    assert report["jobs"] == 20
    assert report["succeeded"] >= 19
    assert report["savings_pct"] > 50


def test_a_list_that_is_not_a_choice_is_not_a_label_set() -> None:
    for prompt in ("Translate 'good morning' into Spanish or French.",
                   "Describe the city as lively, green or quiet.",
                   "Format the answer as JSON or YAML."):
        assert labels(prompt) == [], prompt
