"""Reading answers: GSM8K gold solutions, model outputs, choice letters, majority votes.

Numbers are compared as normalised strings ("1,000" -> "1000", "72.0" -> "72", "$5" -> "5",
"-3" -> "-3"), so an answer is right exactly when it names the same number as the gold one.
"""

from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Iterable, Sequence

from quietstar.utils.errors import QuietStarInputError

# A number as people write it: optional sign, digits with optional thousands commas, optional
# decimals. "1,000" is one number; "1,2" is not a thousands group and reads as "1".
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """The canonical string of the number ``text`` names, or None if it names none.

    Commas, currency signs, surrounding spaces and a trailing full stop are ignored; trailing
    decimal zeros are dropped ("72.50" -> "72.5", "72.0" -> "72").
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def parse_gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution: the number after "####" (e.g. "... #### 1,000" -> "1000")."""
    if "####" not in answer:
        raise QuietStarInputError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}; "
                                  "GSM8K files must keep the dataset's own answer format")
    final = answer.rsplit("####", 1)[1]
    number = normalize_number(final)
    if number is None:
        raise QuietStarInputError(f"GSM8K answer {final.strip()!r} after '####' is not a number")
    return number


def first_number(text: str) -> str | None:
    """The first number written in ``text`` (normalised), or None: "The answer is 1,000." -> "1000"."""
    match = _NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def first_integer(text: str) -> str | None:
    """The first integer in ``text``: the zero-shot chain-of-thought answer rule
    ("Therefore, the answer (arabic numerals) is 18." -> "18"; "3.5" -> "3")."""
    match = re.search(r"-?\d[\d,]*", text)
    if not match:
        return None
    return first_number(match.group().rstrip(","))


def parse_choice(text: str, labels: Sequence[str]) -> str | None:
    """The first choice label standing on its own in ``text``: " B", "(B) ...", "B." -> "B".

    A label inside a word ("Because") does not count.
    """
    pattern = "|".join(re.escape(label) for label in labels)
    match = re.search(rf"(?<![A-Za-z0-9])({pattern})(?![A-Za-z0-9])", text)
    return match.group(1) if match else None


def majority_vote(answers: Iterable[str | None]) -> str | None:
    """The most common answer, ignoring None; ties go to the answer seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    return max(counts, key=counts.__getitem__)  # max keeps the first of equal counts (insertion order)
