"""Integer arithmetic, worked column by column (or by partial products) when the size allows: add, sub, mul."""

from __future__ import annotations

import random
import re

from opensloth.tasks.base import Task, TaskFamily, fits, format_response, jitter, wrong_number

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
    return jitter(rng, fits(chars, 1, 9, 45, 40), 1, 9)


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
    b_digits = jitter(rng, fits(chars, 1, 4, 40, 70), 1, 4)
    a_digits = rng.randint(1, 3 if b_digits > 1 else 4)
    a, b = _random_number(rng, a_digits), _random_number(rng, b_digits)
    reasoning, product = _partial_products(a, b)
    return Task("mul", rng.choice(_MUL_TEMPLATES).format(a=a, b=b), str(product), reasoning)


def _solve(pattern: re.Pattern, kind: str, op):
    def solve(prompt: str) -> str:
        m = pattern.search(prompt)
        if not m:
            raise ValueError(f"{kind} prompt has no '<a> op <b>' expression: {prompt[:80]!r}")
        return str(op(int(m.group(1)), int(m.group(2))))

    return solve


def _wrong_add_sub(rng: random.Random, task: Task) -> str:
    m = (_ADD_RE if task.kind == "add" else _SUB_RE).search(task.prompt)
    a, b = int(m.group(1)), int(m.group(2))
    n = len(str(a))
    for slip in rng.sample(range(n), n):
        steps, value = (_column_add if task.kind == "add" else _column_sub)(a, b, slip)
        if str(value) != task.answer:
            op = "+" if task.kind == "add" else "-"
            return format_response(_arith_reasoning(steps, f"{a} {op} {b} = {value}.", n), str(value))
    wrong = wrong_number(rng, int(task.answer))
    op = "+" if task.kind == "add" else "-"
    return format_response(f"{a} {op} {b} = {wrong}.", str(wrong))


def _wrong_mul(rng: random.Random, task: Task) -> str:
    m = _MUL_RE.search(task.prompt)
    a, b = int(m.group(1)), int(m.group(2))
    n_parts = sum(ch != "0" for ch in str(b))
    reasoning, value = _partial_products(a, b, slip_at=rng.randrange(max(n_parts, 1)))
    if str(value) == task.answer:  # a or b is 0: nothing to slip on
        value = wrong_number(rng, value)
        reasoning = f"{a} * {b} = {value}."
    return format_response(reasoning, str(value))


ADD = TaskFamily("add", _gen_add, _ADD_RE, 8, _solve(_ADD_RE, "add", lambda a, b: a + b), _wrong_add_sub,
                 tokens_per_char=0.52, max_size=230)
SUB = TaskFamily("sub", _gen_sub, _SUB_RE, 9, _solve(_SUB_RE, "sub", lambda a, b: a - b), _wrong_add_sub,
                 tokens_per_char=0.56, max_size=250)
MUL = TaskFamily("mul", _gen_mul, _MUL_RE, 7, _solve(_MUL_RE, "mul", lambda a, b: a * b), _wrong_mul,
                 tokens_per_char=0.71, max_size=180)
