"""Built-in prompt sources: arithmetic problems generated from a seed, and short reasoning and code requests."""

from __future__ import annotations

import random
from dataclasses import dataclass

WORD_PROBLEMS = [
    "If a shirt costs $12 and is on sale for 25% off, what is the sale price? Explain briefly.",
    "Tom has 5 more marbles than Anna. Together they have 21. How many does Anna have? Think step by step.",
    "A rectangle is 7 cm long and 4 cm wide. What are its area and perimeter?",
    "Is 91 a prime number? Explain your reasoning.",
    "What comes next in the sequence 2, 6, 12, 20, 30? Explain the pattern.",
    "A car uses 6 liters of fuel per 100 km. How much fuel does it need for 250 km?",
    "Sort these numbers from smallest to largest: 17, 4, 23, 9, 11.",
    "If today is Wednesday, what day of the week will it be in 10 days?",
    "How many minutes are there in 3.5 hours? Show the calculation.",
    "A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 30 cookies?",
    "Which is larger, 3/4 or 5/7? Explain.",
    "Three friends split a bill of $84 equally. How much does each pay?",
]
CODE = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function that reverses a list without using reverse().",
    "Write a Python function that returns the largest number in a list.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function that converts Celsius to Fahrenheit.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function that sums the digits of an integer.",
    "Write a Python function that merges two sorted lists into one sorted list.",
]

# Held-out requests of the same kinds, none of them in the lists above: what a drafter's held-out
# acceptance is measured on (rl_style_prompts(..., heldout=True)), so that it never sees a prompt it
# was trained on.
HELDOUT_WORD_PROBLEMS = [
    "A train travels 180 km in 2 hours. What is its average speed? Explain briefly.",
    "Maria buys 4 notebooks at $3 each and pays with a $20 bill. How much change does she get?",
    "A square has a perimeter of 36 cm. What is its area? Think step by step.",
    "Is 57 a prime number? Explain your reasoning.",
    "What comes next in the sequence 3, 9, 27, 81? Explain the pattern.",
    "A tank holds 240 liters and fills at 15 liters per minute. How long does it take to fill?",
    "Sort these words alphabetically: pear, apple, mango, banana, cherry.",
    "If it is 9:45 now, what time will it be in 2 hours and 30 minutes?",
    "How many seconds are there in a day? Show the calculation.",
    "A map uses 1 cm for 5 km. How far apart are two towns that are 7.5 cm apart on the map?",
    "Which is larger, 0.35 or 3/8? Explain.",
    "Five workers build a wall in 12 days. How long would 6 workers take at the same rate?",
]
HELDOUT_CODE = [
    "Write a Python function that checks whether two strings are anagrams.",
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that counts the words in a sentence.",
    "Write a Python function that flattens a list of lists into one list.",
    "Write a Python function that returns the second smallest number in a list.",
    "Write a Python function that capitalizes the first letter of every word in a string.",
    "Write a Python function that converts a binary string to an integer.",
    "Write a Python function that returns the greatest common divisor of two integers.",
    "Write a Python function that checks whether a year is a leap year.",
    "Write a Python function that rotates a list to the right by k positions.",
]


@dataclass(frozen=True, slots=True)
class Problem:
    prompt: str
    answer: int


SHORT = "What is {expr}? Answer with just the number."
REASONING = "What is {expr}? Think step by step, then give the final answer on the last line as 'Answer: <number>'."


def arithmetic_problems(n: int, seed: int, digits: int = 1, ops: str = "+-", terms: int = 2, template: str = SHORT) -> list[Problem]:
    """n problems like 'What is 7 + 5?' (`terms` numbers of `digits` digits) with their integer answers;
    subtraction is arranged to stay non-negative."""
    rng = random.Random(seed)
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    out = []
    for _ in range(n):
        nums = [rng.randint(lo, hi) for _ in range(terms)]
        expr, value = str(nums[0]), nums[0]
        for x in nums[1:]:
            op = rng.choice(ops)
            if op == "-" and x > value:
                op = "+"
            value = value + x if op == "+" else value - x if op == "-" else value * x
            expr += f" {op} {x}"
        out.append(Problem(template.format(expr=expr), value))
    return out


def rl_style_prompts(n: int, seed: int, heldout: bool = False) -> list[str]:
    """A mix of arithmetic, short reasoning and code requests, as RL prompt sets look. With `heldout`
    every prompt is one that no seed draws without it: the requests come from the held-out lists and
    the arithmetic has three terms where the others have two."""
    rng = random.Random(seed)
    digits = rng.choice([1, 2])
    pool = [p.prompt for p in arithmetic_problems(n, seed, digits=digits, terms=3 if heldout else 2)]
    words, code = (HELDOUT_WORD_PROBLEMS, HELDOUT_CODE) if heldout else (WORD_PROBLEMS, CODE)
    out = []
    for i in range(n):
        kind = i % 3
        out.append(pool[i] if kind == 0 else rng.choice(words) if kind == 1 else rng.choice(code))
    return out
