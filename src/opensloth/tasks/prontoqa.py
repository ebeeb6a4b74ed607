"""ProntoQA-style true/false reasoning over made-up categories, with a short chain of thought.

"Every wumpus is a yumpus. Max is a wumpus. True or false: Max is a yumpus."
"""

from __future__ import annotations

import random
import re

from opensloth.tasks.base import Task, TaskFamily, fits, format_response, jitter

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
    depth = jitter(rng, fits(chars, 1, 8, 95, 110), 1, 8)
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


def _wrong_prontoqa(rng: random.Random, task: Task) -> str:
    # Replace the final inference of the chain with its negation.
    steps = task.reasoning.rsplit(" So ", 1)
    head, last = steps[0], steps[1]
    flipped = last.replace(" is not ", " is ", 1) if " is not " in last else last.replace(" is ", " is not ", 1)
    wrong = str(task.answer != "True")
    return format_response(f"{head} So {flipped}", wrong)


PRONTOQA = TaskFamily("prontoqa", _gen_prontoqa, re.compile(re.escape(_PRONTO_MARK)), 1, _solve_prontoqa,
                      _wrong_prontoqa, tokens_per_char=0.25, max_size=320)
