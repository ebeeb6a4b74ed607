"""Synthetic tasks with checkable answers: the text of the embedded default.

Everything here is pure Python (stdlib only) and driven by a caller-owned
``random.Random``, so the same seed gives the same tasks on every machine.
``scripts/make_sample_data.py`` turns these tasks into the shipped chat SFT and
preference files, and ``scripts/build_tiny_model.py`` trains the tiny
tokenizer on text made the same way.

A task is a user prompt and one correct answer. Every assistant response ends
with a line ``Answer: <value>`` (:data:`ANSWER_PREFIX`), which is what
:func:`extract_answer` reads back. The verifier :func:`check_answer` does not
need the :class:`Task` object: given only a prompt it recognises the kind and
recomputes the answer from the prompt text, so it can judge model rollouts.

Kinds (:data:`TASK_KINDS`):

- ``add``, ``sub``, ``mul``: small integer arithmetic, worked column by column
  (or by partial products) when the size allows.
- ``reverse``: reverse a string of letters, spelled out.
- ``sort``: sort a list of numbers or letters, ascending or descending.
- ``count``: count one letter in a string, with a running tally.
- ``sum_list``: sum a list of numbers with running totals (long samples).
- ``copy``: repeat a list exactly (long samples).
- ``prontoqa``: ProntoQA-style true/false reasoning over made-up categories
  ("Every wumpus is a yumpus. Max is a wumpus. True or false: Max is a
  yumpus.") with a short chain of thought.

Lengths: :func:`sample_size` draws a lognormal size in tokens; every
generator takes such a ``size`` and picks its parameters (digits, list length,
chain depth) so that prompt plus response come out near it. Sizes are counted
in tokens of the tiny tokenizer (``data/tiny-qwen3``, about 4 characters per
token for ProntoQA prose and 1.2 for digit lists) through a per-kind
characters-per-token estimate; any other tokenizer gives other counts. Mixed
kinds and multi-turn records then give roughly lognormal token lengths.
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass
from typing import Callable

ANSWER_PREFIX = "Answer:"

TASK_KINDS: tuple[str, ...] = (
    "add",
    "sub",
    "mul",
    "reverse",
    "sort",
    "count",
    "sum_list",
    "copy",
    "prontoqa",
)

# Median and spread of the lognormal size (tokens of prompt + response).
SIZE_MEDIAN_TOKENS = 110
SIZE_SIGMA = 0.85
SIZE_MIN_TOKENS = 16
SIZE_MAX_TOKENS = 950
# Token budget of a whole conversation (before the chat template's markers).
CONVERSATION_MAX_TOKENS = 1000


@dataclass(frozen=True)
class Task:
    """One generated problem.

    Attributes:
        kind: one of :data:`TASK_KINDS`.
        prompt: the user message.
        answer: the canonical final answer (what follows ``Answer:``).
        reasoning: worked steps shown before the answer line (may be empty).
    """

    kind: str
    prompt: str
    answer: str
    reasoning: str = ""

    @property
    def response(self) -> str:
        """The correct assistant reply: reasoning, then ``Answer: <answer>``."""
        return format_response(self.reasoning, self.answer)


def format_response(reasoning: str, answer: str) -> str:
    """Join ``reasoning`` and ``answer`` into a reply ending in the answer line."""
    line = f"{ANSWER_PREFIX} {answer}"
    return f"{reasoning}\n{line}" if reasoning else line


def sample_size(rng: random.Random) -> int:
    """Draw a target size in tokens from the clipped lognormal of the data."""
    size = rng.lognormvariate(math.log(SIZE_MEDIAN_TOKENS), SIZE_SIGMA)
    return int(min(max(size, SIZE_MIN_TOKENS), SIZE_MAX_TOKENS))


def _fits(chars: int, lo: int, hi: int, per_unit: float, base: float) -> int:
    """How many units of ``per_unit`` chars fit in ``chars`` after ``base``."""
    return int(min(max(round((chars - base) / per_unit), lo), hi))


def _jitter(rng: random.Random, n: int, lo: int, hi: int) -> int:
    # A little noise so that every size does not map to exactly one length.
    return min(max(n + rng.randint(-1, 1), lo), hi)


# ---------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------

_PLACE_NAMES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands",
                "millions", "ten-millions", "hundred-millions")


def _random_number(rng: random.Random, digits: int) -> int:
    if digits <= 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _column_add(a: int, b: int, drop_carry_at: int | None = None) -> tuple[list[str], int]:
    """Column addition steps for ``a + b``; optionally forget one carry (a slip)."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        new_carry = total // 10
        if drop_carry_at == i and new_carry:
            new_carry = 0
        steps.append(f"{_PLACE_NAMES[i]}: {terms} = {total}, write {total % 10}, carry {new_carry}")
        digits.append(total % 10)
        carry = new_carry
    if carry:
        digits.append(carry)
        steps.append(f"write the final carry {carry}")
    return steps, int("".join(str(d) for d in reversed(digits)))


def _column_sub(a: int, b: int, drop_borrow_at: int | None = None) -> tuple[list[str], int]:
    """Column subtraction steps for ``a - b`` (``a >= b``); optionally forget a borrow."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits, borrow = [], [], 0
    for i in range(len(da)):
        x = int(da[i]) - borrow
        y = int(db[i]) if i < len(db) else 0
        head = f"{_PLACE_NAMES[i]}: {da[i]}" + (f" - {borrow}" if borrow else "") + f" - {y}"
        if x < y:
            digit, new_borrow = x + 10 - y, 1
            if drop_borrow_at == i:
                new_borrow = 0
            steps.append(f"{head}, borrow 10, {x + 10} - {y} = {digit}")
        else:
            digit, new_borrow = x - y, 0
            steps.append(f"{head} = {digit}")
        digits.append(digit)
        borrow = new_borrow
    return steps, int("".join(str(d) for d in reversed(digits)))


_ADD_TEMPLATES = ("What is {a} + {b}?", "Compute {a} + {b}.", "Work out {a} + {b} step by step.",
                  "Please calculate {a} + {b}.")
_SUB_TEMPLATES = ("What is {a} - {b}?", "Compute {a} - {b}.", "Work out {a} - {b} step by step.",
                  "Please calculate {a} - {b}.")
_MUL_TEMPLATES = ("What is {a} * {b}?", "Compute {a} * {b}.", "Multiply: {a} * {b}.",
                  "Please calculate {a} * {b}.")

_ADD_RE = re.compile(r"(\d+) \+ (\d+)")
_SUB_RE = re.compile(r"(\d+) - (\d+)")
_MUL_RE = re.compile(r"(\d+) \* (\d+)")


def _add_sub_digits(rng: random.Random, chars: int) -> int:
    # About 45 characters per column step, 40 for the prompt and answer.
    return _jitter(rng, _fits(chars, 1, 9, 45, 40), 1, 9)


def _gen_add(rng: random.Random, chars: int) -> Task:
    digits = _add_sub_digits(rng, chars)
    a, b = _random_number(rng, digits), _random_number(rng, rng.randint(1, digits))
    steps, total = _column_add(a, b)
    reasoning = _arith_reasoning(steps, f"{a} + {b} = {total}.", digits)
    return Task("add", rng.choice(_ADD_TEMPLATES).format(a=a, b=b), str(total), reasoning)


def _gen_sub(rng: random.Random, chars: int) -> Task:
    digits = _add_sub_digits(rng, chars)
    a, b = _random_number(rng, digits), _random_number(rng, rng.randint(1, digits))
    a, b = max(a, b), min(a, b)
    steps, diff = _column_sub(a, b)
    reasoning = _arith_reasoning(steps, f"{a} - {b} = {diff}.", digits)
    return Task("sub", rng.choice(_SUB_TEMPLATES).format(a=a, b=b), str(diff), reasoning)


def _arith_reasoning(steps: list[str], conclusion: str, digits: int) -> str:
    # One-digit sums are answered directly, longer ones column by column.
    if digits <= 1:
        return conclusion
    return "Column by column, from the right:\n" + "\n".join(steps) + f"\nSo {conclusion}"


def _partial_products(a: int, b: int, slip_at: int | None = None) -> tuple[str, int]:
    """Explain ``a * b`` as a sum of partial products; optionally slip one by 10."""
    parts, terms = [], []
    for i, ch in enumerate(reversed(str(b))):
        if ch == "0":
            continue
        place = int(ch) * 10**i
        product = a * place
        if slip_at is not None and len(parts) == slip_at:
            product += 10 ** max(i, 1)
        parts.append(product)
        terms.append(f"{a} * {place} = {product}")
    total = sum(parts)
    if len(parts) <= 1:
        return f"{a} * {b} = {total}.", total
    return "\n".join(terms) + f"\nAdding: {' + '.join(map(str, parts))} = {total}.", total


def _gen_mul(rng: random.Random, chars: int) -> Task:
    # Partial-product lines run about 25 characters per digit of b.
    b_digits = _jitter(rng, _fits(chars, 1, 4, 40, 70), 1, 4)
    a_digits = rng.randint(1, 3 if b_digits > 1 else 4)
    a, b = _random_number(rng, a_digits), _random_number(rng, b_digits)
    reasoning, product = _partial_products(a, b)
    return Task("mul", rng.choice(_MUL_TEMPLATES).format(a=a, b=b), str(product), reasoning)


# ---------------------------------------------------------------------------
# Strings and lists
# ---------------------------------------------------------------------------

_REVERSE_TEMPLATES = ('Reverse the string "{s}".', 'Write "{s}" backwards.',
                      'What is "{s}" reversed?', 'Reverse the letters of "{s}".')
_REVERSE_RE = re.compile(r'(?:[Rr]everse|backwards)')
_QUOTED_RE = re.compile(r'"([^"]*)"')


def _letters(rng: random.Random, n: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _gen_reverse(rng: random.Random, chars: int) -> Task:
    # Prompt, spelled-out letters and the answer: about 5 characters per letter.
    n = _jitter(rng, _fits(chars, 2, 120, 5.5, 60), 2, 120)
    s = _letters(rng, n)
    rev = s[::-1]
    reasoning = f"The letters are {'-'.join(s)}.\nRead from the end: {'-'.join(rev)}."
    return Task("reverse", rng.choice(_REVERSE_TEMPLATES).format(s=s), rev, reasoning)


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
    n = _jitter(rng, _fits(chars, 2, 150, item_tokens / _TOKENS_PER_CHAR["sort"], 80), 2, 150)
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


_COUNT_TEMPLATES = ('How many times does the letter "{c}" appear in "{s}"?',
                    'Count the letter "{c}" in "{s}".',
                    'In "{s}", how many times does "{c}" occur?')
_COUNT_RE = re.compile(r"(?:[Hh]ow many times|[Cc]ount the letter)")


def _count_tally(s: str, c: str, skip: int | None = None) -> tuple[str, int]:
    """Running tally of ``c`` in ``s``; optionally overlook occurrence number ``skip``."""
    seen, found, marks = 0, 0, []
    for ch in s:
        if ch == c:
            seen += 1
            if skip is not None and seen == skip:
                marks.append(ch)
                continue
            found += 1
            marks.append(f"{ch}({found})")
        else:
            marks.append(ch)
    return f"Going through the letters: {' '.join(marks)}.", found


def _gen_count(rng: random.Random, chars: int) -> Task:
    # Each letter appears in the prompt and in the tally: about 3.5 characters.
    n = _jitter(rng, _fits(chars, 3, 200, 4.0, 90), 3, 200)
    alphabet = rng.choice(("abc", "abcde", "aeiou", string.ascii_lowercase[:10]))
    s = _letters(rng, n, alphabet)
    c = rng.choice(alphabet)
    reasoning, count = _count_tally(s, c)
    template = rng.choice(_COUNT_TEMPLATES)
    return Task("count", template.format(c=c, s=s), str(count), reasoning + f' "{c}" appears {count} times.')


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
    n = _jitter(rng, _fits(chars, 2, 120, 19.5, 70), 2, 120)
    hi = rng.choice((9, 50, 99))
    numbers = [rng.randint(1, hi) for _ in range(n)]
    reasoning, total = _running_sum(numbers)
    prompt = rng.choice(_SUM_TEMPLATES).format(items=_fmt_list(numbers))
    return Task("sum_list", prompt, str(total), reasoning)


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
    n = _jitter(rng, _fits(chars, 2, 200, item_tokens / _TOKENS_PER_CHAR["copy"], 60), 2, 200)
    items = [make() for _ in range(n)]
    prompt = rng.choice(_COPY_TEMPLATES).format(items=_fmt_list(items))
    return Task("copy", prompt, _fmt_list(items), f"The list has {n} items.")


# ---------------------------------------------------------------------------
# ProntoQA-style true/false reasoning
# ---------------------------------------------------------------------------

_CONCEPTS = ("wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus",
             "impus", "jompus", "gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus",
             "brimpus", "felpus", "kerpus", "quimpus", "orpus", "habpus")
_NAMES = ("Max", "Alex", "Sam", "Polly", "Rex", "Fae", "Wren", "Stella", "Sally", "Theo", "Ivy", "Otto")
_PRONTO_TEMPLATES = ("{facts} True or false: {query}",
                     "{facts}\nTrue or false: {query}",
                     "Read the rules. {facts} True or false: {query}")
_PRONTO_MARK = "True or false:"
_RULE_RE = re.compile(r"(?:Every|Each) (\w+) is (not )?an? (\w+)\.")
_MEMBER_RE = re.compile(r"\b([A-Z][a-z]+) is an? (\w+)\.")
_QUERY_RE = re.compile(r"True or false: ([A-Z][a-z]+) is (not )?an? (\w+)\.")


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _rule(src: str, dst: str, negated: bool) -> str:
    return f"Every {src} is {'not ' if negated else ''}{_a(dst)}."


def _gen_prontoqa(rng: random.Random, chars: int) -> Task:
    """A chain ``name -> c0 -> ... -> c_depth``, distractor rules, and a query at its end."""
    # A chain step costs about 30 characters of rule and 60 of reasoning.
    depth = _jitter(rng, _fits(chars, 1, 8, 95, 110), 1, 8)
    n_distract = min(max(int((chars - 110 - 95 * depth) / 30), 0), 8) if chars > 110 + 95 * depth else 0
    concepts = rng.sample(_CONCEPTS, depth + 2 + n_distract)
    chain, spare, distract = concepts[: depth + 1], concepts[depth + 1], concepts[depth + 2 :]
    name = rng.choice(_NAMES)
    negated_end = rng.random() < 0.5
    rules = [(chain[i], chain[i + 1], False) for i in range(depth - 1)]
    rules.append((chain[depth - 1], chain[depth], negated_end))
    # Query: the last concept (its truth follows from the last rule), or its
    # negation, so the answer is balanced between True and False.
    query_negated = rng.random() < 0.5
    truth = (not negated_end) != query_negated
    # Distractor rules hang off the chain without touching the query concept.
    for d in distract:
        src = rng.choice(chain[:-1] + [spare])
        rules.append((src, d, rng.random() < 0.3))
    rng.shuffle(rules)
    facts = " ".join(_rule(*r) for r in rules) + f" {name} is {_a(chain[0])}."
    query = f"{name} is {'not ' if query_negated else ''}{_a(chain[depth])}."
    prompt = rng.choice(_PRONTO_TEMPLATES).format(facts=facts, query=query)

    steps = [f"{name} is {_a(chain[0])}."]
    for i in range(depth):
        neg = negated_end and i == depth - 1
        steps.append(f"{_rule(chain[i], chain[i + 1], neg)} So {name} is "
                     f"{'not ' if neg else ''}{_a(chain[i + 1])}.")
    return Task("prontoqa", prompt, str(truth), " ".join(steps))


def _solve_prontoqa(prompt: str) -> str:
    query = _QUERY_RE.search(prompt)
    if not query:
        raise ValueError(f"prontoqa prompt has no 'True or false: <Name> is a <x>.' query: {prompt[:80]!r}")
    name, query_neg, target = query.group(1), bool(query.group(2)), query.group(3)
    facts = prompt[: query.start()]
    rules = [(m.group(1), m.group(3), bool(m.group(2))) for m in _RULE_RE.finditer(facts)]
    # Membership facts are the "<Name> is a <x>." sentences that are not rules.
    known = {m.group(2): True for m in _MEMBER_RE.finditer(facts) if m.group(1) == name}
    changed = True
    while changed:  # forward chaining; positive facts only propagate
        changed = False
        for src, dst, neg in rules:
            if known.get(src) is True and dst not in known:
                known[dst] = not neg
                changed = True
    if target not in known:
        raise ValueError(f"prontoqa prompt does not decide whether {name} is {_a(target)}")
    return str(known[target] != query_neg)


# ---------------------------------------------------------------------------
# Registry, solving and checking
# ---------------------------------------------------------------------------

_GENERATORS: dict[str, Callable[[random.Random, int], Task]] = {
    "add": _gen_add,
    "sub": _gen_sub,
    "mul": _gen_mul,
    "reverse": _gen_reverse,
    "sort": _gen_sort,
    "count": _gen_count,
    "sum_list": _gen_sum_list,
    "copy": _gen_copy,
    "prontoqa": _gen_prontoqa,
}

# Tokens per character of each kind's text with the tiny tokenizer (measured
# on the shipped data): generators size their output in characters, and
# make_task converts a token size with these.
_TOKENS_PER_CHAR = {"add": 0.52, "sub": 0.56, "mul": 0.71, "reverse": 0.47, "sort": 0.74, "count": 0.5,
                    "sum_list": 0.84, "copy": 0.72, "prontoqa": 0.25}

# Rough largest size (tokens) each kind reaches; a large size is only given to
# kinds that can grow that far.
_MAX_SIZE = {"add": 230, "sub": 250, "mul": 180, "reverse": 330, "sort": 950, "count": 400,
             "sum_list": 950, "copy": 950, "prontoqa": 320}

# Order matters: prompts are matched against the most specific marker first
# (a ProntoQA prompt may contain any word; an arithmetic prompt only numbers).
_DETECTORS: tuple[tuple[str, re.Pattern], ...] = (
    ("prontoqa", re.compile(re.escape(_PRONTO_MARK))),
    ("count", _COUNT_RE),
    ("reverse", _REVERSE_RE),
    ("copy", _COPY_RE),
    ("sum_list", _SUM_RE),
    ("sort", _SORT_RE),
    ("mul", _MUL_RE),
    ("add", _ADD_RE),
    ("sub", _SUB_RE),
)


def make_task(rng: random.Random, kind: str | None = None, size: int | None = None) -> Task:
    """Generate one task.

    Args:
        rng: the random source (the caller owns the seed).
        kind: one of :data:`TASK_KINDS`; ``None`` picks one uniformly among the
            kinds that can reach ``size``.
        size: target tokens of prompt plus response (approximate, see the
            module docstring); ``None`` draws one with :func:`sample_size`.

    Returns:
        A :class:`Task`.

    Raises:
        ValueError: ``kind`` is not a known task kind.
    """
    if size is None:
        size = sample_size(rng)
    if kind is None:
        candidates = [k for k in TASK_KINDS if _MAX_SIZE[k] >= size] or ["copy", "sum_list"]
        kind = rng.choice(candidates)
    if kind not in _GENERATORS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}")
    return _GENERATORS[kind](rng, int(size / _TOKENS_PER_CHAR[kind]))


def detect_kind(prompt: str) -> str:
    """Return the task kind a prompt was generated as.

    Raises:
        ValueError: the prompt matches no kind.
    """
    for kind, pattern in _DETECTORS:
        if pattern.search(prompt):
            return kind
    raise ValueError(f"cannot tell the task kind of prompt {prompt[:80]!r}")


def solve(kind: str | None, prompt: str) -> str:
    """Recompute the correct answer of a generated prompt from its text alone.

    Args:
        kind: the task kind, or ``None`` to detect it from the prompt.
        prompt: the user message of a task.

    Returns:
        The canonical answer string (the same as ``Task.answer``).

    Raises:
        ValueError: the kind is unknown or the prompt cannot be parsed as it.
    """
    kind = kind or detect_kind(prompt)
    if kind in ("add", "sub", "mul"):
        pattern = {"add": _ADD_RE, "sub": _SUB_RE, "mul": _MUL_RE}[kind]
        m = pattern.search(prompt)
        if not m:
            raise ValueError(f"{kind} prompt has no '<a> op <b>' expression: {prompt[:80]!r}")
        a, b = int(m.group(1)), int(m.group(2))
        return str({"add": a + b, "sub": a - b, "mul": a * b}[kind])
    if kind in ("reverse", "count"):
        quoted = _QUOTED_RE.findall(prompt)
        if kind == "reverse" and quoted:
            return quoted[0][::-1]
        if kind == "count" and len(quoted) == 2:
            letter, text = sorted(quoted, key=len)
            return str(text.count(letter))
        raise ValueError(f"{kind} prompt has unexpected quoted parts: {prompt[:80]!r}")
    if kind in ("sort", "sum_list", "copy"):
        m = _LIST_RE.search(prompt)
        if not m:
            raise ValueError(f"{kind} prompt has no [..] list: {prompt[:80]!r}")
        items = _parse_list(m.group(1))
        if kind == "sort":
            return _fmt_list(_sort_items(items, "descending" in prompt))
        if kind == "sum_list":
            return str(sum(int(x) for x in items))
        return _fmt_list(items)
    if kind == "prontoqa":
        return _solve_prontoqa(prompt)
    raise ValueError(f"unknown task kind {kind!r}; choose one of {', '.join(TASK_KINDS)}")


_ANSWER_RE = re.compile(r"answer\s*[:=]\s*(.*)", re.IGNORECASE)


def extract_answer(response: str) -> str | None:
    """Pull the final answer out of a free-form response.

    Takes the text after the last ``Answer:`` (case-insensitive) on its line;
    without one, falls back to the last whitespace-separated token.

    Returns:
        The raw answer text, or ``None`` for an empty response.
    """
    matches = [m.group(1).strip() for m in _ANSWER_RE.finditer(response)]
    matches = [m for m in matches if m]
    if matches:
        return matches[-1]
    tokens = response.split()
    return tokens[-1] if tokens else None


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: no whitespace, no wrapping quotes or final period, lower case."""
    text = re.sub(r"\s+", "", answer).strip()
    text = text.rstrip(".").strip("\"'`*").rstrip(".")
    return text.lower()


def check_answer(task_or_kind: Task | str | None, prompt: str | None, response: str) -> bool:
    """Judge a response: does its final answer equal the correct one?

    Args:
        task_or_kind: a :class:`Task` (its ``answer`` is the reference and
            ``prompt`` may be ``None``), a kind name, or ``None`` to detect the
            kind from ``prompt``.
        prompt: the user message the response answers.
        response: the model's reply; the answer is read with
            :func:`extract_answer`.

    Returns:
        ``True`` when the normalized answers match.

    Raises:
        ValueError: no ``Task`` was given and the prompt cannot be solved.
    """
    if isinstance(task_or_kind, Task):
        expected = task_or_kind.answer
    else:
        if prompt is None:
            raise ValueError("check_answer needs the prompt when no Task is given")
        expected = solve(task_or_kind, prompt)
    got = extract_answer(response)
    return got is not None and normalize_answer(got) == normalize_answer(expected)


# ---------------------------------------------------------------------------
# Wrong answers (for rejected preference responses)
# ---------------------------------------------------------------------------


def _wrong_number(rng: random.Random, value: int) -> int:
    delta = rng.choice((1, -1, 10, -10, 2, -2))
    return value + delta if value + delta >= 0 and value + delta != value else value + 1


def make_wrong_response(rng: random.Random, task: Task) -> str:
    """A plausible but wrong reply to ``task``: the same shape, one slip.

    The slip is one a careless solver makes (a dropped carry, a missed letter,
    two swapped items, a flipped last inference), so the reply looks like the
    correct one and only its content is wrong.

    Returns:
        A response whose :func:`extract_answer` differs from ``task.answer``.
    """
    prompt = task.prompt
    if task.kind in ("add", "sub"):
        m = (_ADD_RE if task.kind == "add" else _SUB_RE).search(prompt)
        a, b = int(m.group(1)), int(m.group(2))
        n = len(str(a))
        for slip in rng.sample(range(n), n):
            steps, value = (_column_add if task.kind == "add" else _column_sub)(a, b, slip)
            if str(value) != task.answer:
                op = "+" if task.kind == "add" else "-"
                return format_response(_arith_reasoning(steps, f"{a} {op} {b} = {value}.", n), str(value))
        wrong = _wrong_number(rng, int(task.answer))
        op = "+" if task.kind == "add" else "-"
        return format_response(f"{a} {op} {b} = {wrong}.", str(wrong))
    if task.kind == "mul":
        m = _MUL_RE.search(prompt)
        a, b = int(m.group(1)), int(m.group(2))
        n_parts = sum(ch != "0" for ch in str(b))
        reasoning, value = _partial_products(a, b, slip_at=rng.randrange(max(n_parts, 1)))
        if str(value) == task.answer:  # a or b is 0: nothing to slip on
            value = _wrong_number(rng, value)
            reasoning = f"{a} * {b} = {value}."
        return format_response(reasoning, str(value))
    if task.kind == "reverse":
        rev = list(task.answer)
        if len(set(rev)) == 1:
            wrong = task.answer + rev[0]
        else:
            while "".join(rev) == task.answer:
                i = rng.randrange(len(rev) - 1)
                rev[i], rev[i + 1] = rev[i + 1], rev[i]
            wrong = "".join(rev)
        s = task.answer[::-1]
        reasoning = f"The letters are {'-'.join(s)}.\nRead from the end: {'-'.join(wrong)}."
        return format_response(reasoning, wrong)
    if task.kind == "count":
        letter, text = sorted(_QUOTED_RE.findall(prompt), key=len)
        count = int(task.answer)
        if count > 0 and rng.random() < 0.7:
            reasoning, found = _count_tally(text, letter, skip=rng.randint(1, count))
        else:
            reasoning, found = _count_tally(text, letter)
            found += 1
        return format_response(reasoning + f' "{letter}" appears {found} times.', str(found))
    if task.kind in ("sort", "copy"):
        items = _parse_list(task.answer[1:-1])
        wrong = list(items)
        if len(set(items)) > 1 and rng.random() < 0.7:
            while wrong == items:
                i = rng.randrange(len(wrong) - 1)
                wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        else:
            del wrong[rng.randrange(len(wrong))]
        return format_response(task.reasoning, _fmt_list(wrong))
    if task.kind == "sum_list":
        numbers = [int(x) for x in _parse_list(_LIST_RE.search(prompt).group(1))]
        reasoning, total = _running_sum(numbers, slip_at=rng.randrange(1, len(numbers)))
        return format_response(reasoning, str(total))
    if task.kind == "prontoqa":
        # Replace the final inference of the chain with its negation.
        steps = task.reasoning.rsplit(" So ", 1)
        head, last = steps[0], steps[1]
        flipped = last.replace(" is not ", " is ", 1) if " is not " in last else last.replace(" is ", " is not ", 1)
        wrong = str(task.answer != "True")
        return format_response(f"{head} So {flipped}", wrong)
    raise ValueError(f"unknown task kind {task.kind!r}")


# ---------------------------------------------------------------------------
# Records: chat conversations and preference pairs
# ---------------------------------------------------------------------------

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a careful assistant. Show your work, then give the final answer on a line starting with 'Answer:'.",
    "Solve each problem exactly. End with the final answer.",
    "You are a patient tutor who explains each step briefly.",
)
_FOLLOW_UP_PREFIXES = ("", "", "Next one. ", "Thanks! Now this: ", "Good. ", "One more: ")


def make_conversation(rng: random.Random) -> dict:
    """One chat SFT record in the ``messages`` format of trl-lib/Capybara.

    About 30% carry a system message; 70% are one turn, 20% two and 10% three
    turns, each turn a fresh task (often of the same kind). Every assistant
    turn ends with ``Answer: <value>`` and is checkable against the user turn
    before it with :func:`check_answer`.

    Returns:
        ``{"messages": [{"role", "content"}, ...], "source": <kind of the first task>}``.
    """
    messages: list[dict] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    n_turns = rng.choices((1, 2, 3), weights=(0.7, 0.2, 0.1))[0]
    budget = CONVERSATION_MAX_TOKENS
    first_kind = None
    for turn in range(n_turns):
        size = sample_size(rng)
        if turn and size > budget:
            break
        kind = None
        if first_kind is not None and rng.random() < 0.5:
            kind = first_kind if _MAX_SIZE[first_kind] >= size else None
        task = make_task(rng, kind=kind, size=size)
        first_kind = first_kind or task.kind
        prefix = rng.choice(_FOLLOW_UP_PREFIXES) if turn else ""
        messages.append({"role": "user", "content": prefix + task.prompt})
        messages.append({"role": "assistant", "content": task.response})
        budget -= size
    return {"messages": messages, "source": first_kind}


def make_preference_pair(rng: random.Random) -> dict:
    """One preference record in TRL's standard (string) form.

    Returns:
        ``{"prompt": user message, "chosen": correct reply with reasoning,
        "rejected": same-shaped reply with one slip and a wrong answer}``.
    """
    task = make_task(rng)
    return {"prompt": task.prompt, "chosen": task.response, "rejected": make_wrong_response(rng, task)}
