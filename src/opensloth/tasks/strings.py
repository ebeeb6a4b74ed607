"""Letter tasks: reverse a string (spelled out), count one letter (with a running tally)."""

from __future__ import annotations

import random
import re
import string

from opensloth.tasks.base import Task, TaskFamily, fits, format_response, jitter

_REVERSE_TEMPLATES = ('Reverse the string "{s}".', 'Write "{s}" backwards.',
                      'What is "{s}" reversed?', 'Reverse the letters of "{s}".')
_REVERSE_RE = re.compile(r'(?:[Rr]everse|backwards)')
_QUOTED_RE = re.compile(r'"([^"]*)"')


def _letters(rng: random.Random, n: int, alphabet: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _gen_reverse(rng: random.Random, chars: int) -> Task:
    # Prompt, spelled-out letters and the answer: about 5 characters per letter.
    n = jitter(rng, fits(chars, 2, 120, 5.5, 60), 2, 120)
    s = _letters(rng, n)
    rev = s[::-1]
    reasoning = f"The letters are {'-'.join(s)}.\nRead from the end: {'-'.join(rev)}."
    return Task("reverse", rng.choice(_REVERSE_TEMPLATES).format(s=s), rev, reasoning)


def _solve_reverse(prompt: str) -> str:
    quoted = _QUOTED_RE.findall(prompt)
    if quoted:
        return quoted[0][::-1]
    raise ValueError(f"reverse prompt has unexpected quoted parts: {prompt[:80]!r}")


def _wrong_reverse(rng: random.Random, task: Task) -> str:
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
    n = jitter(rng, fits(chars, 3, 200, 4.0, 90), 3, 200)
    alphabet = rng.choice(("abc", "abcde", "aeiou", string.ascii_lowercase[:10]))
    s = _letters(rng, n, alphabet)
    c = rng.choice(alphabet)
    reasoning, count = _count_tally(s, c)
    template = rng.choice(_COUNT_TEMPLATES)
    return Task("count", template.format(c=c, s=s), str(count), reasoning + f' "{c}" appears {count} times.')


def _solve_count(prompt: str) -> str:
    quoted = _QUOTED_RE.findall(prompt)
    if len(quoted) == 2:
        letter, text = sorted(quoted, key=len)
        return str(text.count(letter))
    raise ValueError(f"count prompt has unexpected quoted parts: {prompt[:80]!r}")


def _wrong_count(rng: random.Random, task: Task) -> str:
    letter, text = sorted(_QUOTED_RE.findall(task.prompt), key=len)
    count = int(task.answer)
    if count > 0 and rng.random() < 0.7:
        reasoning, found = _count_tally(text, letter, skip=rng.randint(1, count))
    else:
        reasoning, found = _count_tally(text, letter)
        found += 1
    return format_response(reasoning + f' "{letter}" appears {found} times.', str(found))


REVERSE = TaskFamily("reverse", _gen_reverse, _REVERSE_RE, 3, _solve_reverse, _wrong_reverse,
                     tokens_per_char=0.47, max_size=330)
COUNT = TaskFamily("count", _gen_count, _COUNT_RE, 2, _solve_count, _wrong_count, tokens_per_char=0.5, max_size=400)
