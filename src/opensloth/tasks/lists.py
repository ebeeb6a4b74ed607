"""List tasks: sort numbers or letters, sum a list with running totals, copy a list exactly."""

from __future__ import annotations

import random
import re
import string

from opensloth.tasks.base import Task, TaskFamily, fits, format_response, jitter

SORT_TOKENS_PER_CHAR = 0.74
COPY_TOKENS_PER_CHAR = 0.72

_SORT_TEMPLATES = ("Sort these {what} in {order} order: {items}",
                   "Put the {what} {items} in {order} order.",
                   "Arrange in {order} order: {items} ({what})")
_SORT_RE = re.compile(r"\b(?:[Ss]ort|[Aa]rrange|[Pp]ut the)\b")
_LIST_RE = re.compile(r"\[([^\[\]]*)\]")


def _fmt_list(items: list) -> str:
    return "[" + ", ".join(str(x) for x in items) + "]"


def _parse_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _sort_items(items: list[str], descending: bool) -> list[str]:
    if all(re.fullmatch(r"-?\d+", x) for x in items):
        return sorted(items, key=int, reverse=descending)
    return sorted(items, reverse=descending)


def _gen_sort(rng: random.Random, chars: int) -> Task:
    use_letters = rng.random() < 0.35
    hi = 0 if use_letters else rng.choice((9, 99, 999))
    # Tokens per item, prompt and answer together: a letter and a comma, or
    # the digits (one token each), a comma and a space.
    item_tokens = {0: 4, 9: 6, 99: 8, 999: 10}[hi]
    n = jitter(rng, fits(chars, 2, 150, item_tokens / SORT_TOKENS_PER_CHAR, 80), 2, 150)
    if use_letters:
        items = [rng.choice(string.ascii_lowercase) for _ in range(n)]
        what = "letters"
    else:
        items = [str(rng.randint(0, hi)) for _ in range(n)]
        what = "numbers"
    descending = rng.random() < 0.3
    order = "descending" if descending else "ascending"
    answer = _fmt_list(_sort_items(items, descending))
    prompt = rng.choice(_SORT_TEMPLATES).format(what=what, order=order, items=_fmt_list(items))
    lead = "largest" if descending else "smallest"
    if what == "letters":
        lead = "last in the alphabet" if descending else "first in the alphabet"
    reasoning = f"There are {n} {what}. Listing them {lead} first."
    return Task("sort", prompt, answer, reasoning)


def _items_of(kind: str, prompt: str) -> list[str]:
    m = _LIST_RE.search(prompt)
    if not m:
        raise ValueError(f"{kind} prompt has no [..] list: {prompt[:80]!r}")
    return _parse_list(m.group(1))


def _solve_sort(prompt: str) -> str:
    return _fmt_list(_sort_items(_items_of("sort", prompt), "descending" in prompt))


def _wrong_list(rng: random.Random, task: Task) -> str:
    """sort and copy: two neighbours swapped, or one item dropped."""
    items = _parse_list(task.answer[1:-1])
    wrong = list(items)
    if len(set(items)) > 1 and rng.random() < 0.7:
        while wrong == items:
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    else:
        del wrong[rng.randrange(len(wrong))]
    return format_response(task.reasoning, _fmt_list(wrong))


_SUM_TEMPLATES = ("Find the sum of these numbers: {items}",
                  "What is the total of {items}?",
                  "Add up the numbers {items}.")
_SUM_RE = re.compile(r"(?:[Ss]um of these|[Tt]otal of|[Aa]dd up)")


def _running_sum(numbers: list[int], slip_at: int | None = None) -> tuple[str, int]:
    """Running totals of ``numbers``; optionally slip one partial sum by 10."""
    total, lines = numbers[0], [f"Start with {numbers[0]}."]
    for i, x in enumerate(numbers[1:], start=1):
        new = total + x + (10 if slip_at == i else 0)
        lines.append(f"{total} + {x} = {new}")
        total = new
    return "\n".join(lines), total


def _gen_sum_list(rng: random.Random, chars: int) -> Task:
    n = jitter(rng, fits(chars, 2, 120, 19.5, 70), 2, 120)
    hi = rng.choice((9, 50, 99))
    numbers = [rng.randint(1, hi) for _ in range(n)]
    reasoning, total = _running_sum(numbers)
    prompt = rng.choice(_SUM_TEMPLATES).format(items=_fmt_list(numbers))
    return Task("sum_list", prompt, str(total), reasoning)


def _solve_sum_list(prompt: str) -> str:
    return str(sum(int(x) for x in _items_of("sum_list", prompt)))


def _wrong_sum_list(rng: random.Random, task: Task) -> str:
    numbers = [int(x) for x in _parse_list(_LIST_RE.search(task.prompt).group(1))]
    reasoning, total = _running_sum(numbers, slip_at=rng.randrange(1, len(numbers)))
    return format_response(reasoning, str(total))


_COPY_TEMPLATES = ("Repeat this list exactly: {items}",
                   "Copy the following list without changes: {items}",
                   "Echo back the list {items}")
_COPY_RE = re.compile(r"(?:[Rr]epeat this list|[Cc]opy the following|[Ee]cho back)")


def _gen_copy(rng: random.Random, chars: int) -> Task:
    kind = rng.choice(("digits", "numbers", "words"))
    # Tokens per item in prompt and answer together (see _gen_sort).
    if kind == "words":
        pool = ("apple", "river", "stone", "cloud", "lamp", "tiger", "maple", "bread", "chair", "ocean",
                "green", "seven", "north", "piano", "candle", "honey", "silver", "garden")
        item_tokens, make = 5, lambda: rng.choice(pool)
    elif kind == "numbers":
        item_tokens, make = 10, lambda: str(rng.randint(10, 999))
    else:
        item_tokens, make = 6, lambda: str(rng.randint(0, 9))
    n = jitter(rng, fits(chars, 2, 200, item_tokens / COPY_TOKENS_PER_CHAR, 60), 2, 200)
    items = [make() for _ in range(n)]
    prompt = rng.choice(_COPY_TEMPLATES).format(items=_fmt_list(items))
    return Task("copy", prompt, _fmt_list(items), f"The list has {n} items.")


def _solve_copy(prompt: str) -> str:
    return _fmt_list(_items_of("copy", prompt))


SORT = TaskFamily("sort", _gen_sort, _SORT_RE, 6, _solve_sort, _wrong_list, tokens_per_char=SORT_TOKENS_PER_CHAR,
                  max_size=950)
SUM_LIST = TaskFamily("sum_list", _gen_sum_list, _SUM_RE, 5, _solve_sum_list, _wrong_sum_list, tokens_per_char=0.84,
                      max_size=950)
COPY = TaskFamily("copy", _gen_copy, _COPY_RE, 4, _solve_copy, _wrong_list, tokens_per_char=COPY_TOKENS_PER_CHAR,
                  max_size=950)
