"""Training prompts the policy writes itself (self-instruct), for drafters that must meet prompts they
were not trained on (a probe for [draft], used by eagle_variants.py --source self-instruct).

RL-style prompts draw their requests from two short lists (data/tasks.py), so a drafter trained on
them sees the same 22 requests hundreds of times; on requests it never saw, the default eagle head
accepts about 10 points less (RESULTS.md). Nothing may be fetched from a hub, so the variety comes
from the policy: asked for a word problem or a code request on one of many topics, at temperature 1,
it writes a new one each time. The mix stays that of RL-style prompts (a third each: arithmetic,
word problems, code requests), and no prompt it writes is one of the held-out lists'.

Measured (RESULTS.md, 2026-11-29): a head trained on the policy's answers to 640 such prompts accepts
no more on held-out prompts than one trained on RL-style prompts (45.4% at temperature 0.5, 43.2% at
1, against 46.2%), so distill-draft does not offer it.
"""

from __future__ import annotations

import random

from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.tasks import HELDOUT_CODE, HELDOUT_WORD_PROBLEMS, arithmetic_problems
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.errors import RlhfspecError
from rlhfspec.rollout.generate import generate

WORD_TOPICS = (
    "shopping and discounts", "sharing money between friends", "travel time and speed", "cooking and recipes",
    "ages of family members", "areas of rooms", "saving money each week", "fuel use of a car", "counting coins",
    "time zones", "a school timetable", "buying fruit at a market", "painting a fence", "filling a water tank",
    "a train schedule", "percent of a class", "average test scores", "perimeter of a garden", "mixing paint colours",
    "a bakery's daily sales", "sports scores", "reading pages of a book", "building with bricks", "temperature changes",
    "days of the week", "ratios in a recipe", "a bus with passengers getting on and off", "measuring lengths in cm and m",
    "prime numbers", "fractions of a pizza", "number sequences", "interest on savings", "probability with dice",
    "the volume of a box", "hours worked and pay", "sorting numbers", "a marathon runner's pace", "stacking boxes",
)
CODE_TOPICS = (
    "strings", "lists of numbers", "dictionaries", "sets", "sorting", "searching a list", "prime numbers", "dates",
    "matrices", "text files", "counting characters", "binary numbers", "recursion", "stacks", "queues", "intervals",
    "temperatures", "word frequencies", "palindromes", "nested lists", "averages", "random numbers", "tuples",
    "email addresses", "roman numerals", "grades of students", "shopping carts", "time in hours and minutes",
)
ASK = {
    "word": "Write one short math word problem about {topic}. Write only the problem, nothing else.",
    "code": "Write one short request asking for a Python function that works with {topic}. Write only the request, nothing else.",
}
PREFIXES = ("problem:", "question:", "request:", "task:", "here is", "sure")


def clean(text: str) -> str | None:
    """The prompt in what the policy wrote: its first line without labels, markup or quotes (a line
    ending in a colon is a heading: the next one); None if that is too short or too long to be one
    request."""
    for line in text.strip().splitlines():
        line = line.strip().strip("*#\"' ").strip()
        low = line.lower()
        for prefix in PREFIXES:
            if low.startswith(prefix):
                line = line[len(prefix):].strip(" :*\"'")
                low = line.lower()
        if line and not line.endswith(":"):
            return line if 20 <= len(line) <= 300 else None
    return None


def self_instruct_prompts(policy, tokenizer, n: int, seed: int, log=print, temperature: float = 0.5) -> list[str]:
    """n RL-style prompts, the word problems and code requests written by the policy at `temperature`,
    seeded with `seed`; arithmetic as rl_style_prompts draws it. (At temperature 1 the default policy
    writes mostly incoherent requests; at 0.5 mostly sensible ones.)"""
    rng = random.Random(seed)
    arithmetic = [p.prompt for p in arithmetic_problems(n, seed, digits=rng.choice([1, 2]))]
    kinds = ["word" if i % 3 == 1 else "code" for i in range(n) if i % 3]
    written: dict[str, list[str]] = {"word": [], "code": []}
    heldout = set(HELDOUT_WORD_PROBLEMS) | set(HELDOUT_CODE)
    need = {k: kinds.count(k) for k in written}
    rounds = 0
    while any(len(written[k]) < need[k] for k in written):
        asks = [(k, ASK[k].format(topic=rng.choice(WORD_TOPICS if k == "word" else CODE_TOPICS)))
                for k in written for _ in range(need[k] - len(written[k]))]
        outs = generate(policy, [encode_prompt(tokenizer, a) for _, a in asks], SamplingParams(temperature=temperature, max_new_tokens=64),
                        seed=seed + 7919 * rounds, tokenizer=tokenizer)
        for (k, _), out in zip(asks, outs):
            prompt = clean(tokenizer.decode(out.token_ids, skip_special_tokens=True))
            if prompt is not None and prompt not in heldout and len(written[k]) < need[k]:
                written[k].append(prompt)
        rounds += 1
        if rounds == 20:
            raise RlhfspecError(f"The policy wrote too few usable prompts in 20 rounds ({len(written['word'])} of {need['word']} word "
                                f"problems, {len(written['code'])} of {need['code']} code requests); use RL-style prompts with this policy.")
        log(f"self-instruct round {rounds}: {len(written['word'])}/{need['word']} word problems, {len(written['code'])}/{need['code']} code requests")
    it = {k: iter(v) for k, v in written.items()}
    return [arithmetic[i] if i % 3 == 0 else next(it["word" if i % 3 == 1 else "code"]) for i in range(n)]
