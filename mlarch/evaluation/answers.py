"""Reading numeric answers out of model completions and data items (pure Python).

Numbers are compared as canonical strings: no thousands separators, no trailing
decimal zeros, no "-0", ASCII digits (a number written in another script's decimal
digits, e.g. Bengali "১২", reads as "12"). A leading-dot decimal ".5" reads as 0.5.
"""

from __future__ import annotations

import decimal
import re

STOPS: tuple[str, ...] = ("\n\n", "\nQ:")

# A minus (ASCII or U+2212) counts only when no word character precedes it: "5-3" is 5 and 3.
# Comma groups only as thousands separators ("1,234" but "3,4" and "12,34" are two numbers);
# a decimal part only when a digit follows the dot ("42." is 42).
_NUMBER = re.compile(
    r"(?P<sign>(?<!\w)[-\u2212])?"
    r"(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+)"
)
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)


def cut(completion: str, stops=STOPS) -> str:
    """The text before the first stop string (the whole text if none occurs)."""
    end = len(completion)
    for stop in stops:
        at = completion.find(stop)
        if at != -1:
            end = min(end, at)
    return completion[:end]


def _canonical(match: re.Match) -> str:
    body = match.group("body").replace(",", "")
    # precision wide enough that normalize() never rounds a long number
    context = decimal.Context(prec=len(body) + 2)
    value = context.normalize(decimal.Decimal(body))
    if match.group("sign") and not value.is_zero():
        value = -value
    return format(value, "f")


def _numbers(text: str) -> list[re.Match]:
    return list(_NUMBER.finditer(text))


def number(text: str) -> str | None:
    """Canonical form of the (first) number in `text`: "1,234" -> "1234", "3.50" -> "3.5";
    None when `text` holds no number."""
    match = _NUMBER.search(text)
    return _canonical(match) if match else None


def extract(completion: str) -> str | None:
    """The answer in a (cut) completion: the first number after the last "####", else after
    the last "answer is" (any case), else the last number in the text."""
    at = completion.rfind("####")
    if at != -1:
        return number(completion[at + 4 :])
    found = list(_ANSWER_IS.finditer(completion))
    if found:
        return number(completion[found[-1].end() :])
    numbers = _numbers(completion)
    return _canonical(numbers[-1]) if numbers else None


def reference(answer: str) -> str | None:
    """The reference number of a data item's answer field: after the last "####" (GSM8K),
    else the last number in the text (MGSM's answer is just the number)."""
    answer = str(answer)  # MGSM-style data may hold the answer as a JSON number
    at = answer.rfind("####")
    if at != -1:
        return number(answer[at + 4 :])
    numbers = _numbers(answer)
    return _canonical(numbers[-1]) if numbers else None


def correct(extracted: str | None, reference: str | None) -> bool:
    """Both answers present and equal as canonical strings."""
    return extracted is not None and reference is not None and extracted == reference
