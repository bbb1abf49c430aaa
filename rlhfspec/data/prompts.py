"""Built-in prompts: a few chat questions for demos and benchmarks, with varied lengths."""

DEMO_PROMPTS = [
    "What is 7 + 5? Answer with just the number.",
    "Write a haiku about the sea.",
    "Name three primary colors.",
    "Explain in one sentence why the sky is blue.",
]

BENCH_PROMPTS = [
    "What is 2+3?",
    "Write a haiku about the sea.",
    "Name three colors.",
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old in a few sentences.",
    "List the planets of the solar system in order from the sun.",
    "Write a short Python function that returns the factorial of n.",
    "Give me three tips for staying focused while studying, with a sentence on each.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h? Show your reasoning.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the main differences between a list and a tuple in Python?",
    "Describe a sunset over the mountains.",
    "If I have 3 apples and buy 4 more, then eat 2, how many apples do I have? Think step by step.",
    "Write a limerick about a cat who loves to code.",
    "Why do leaves change color in autumn?",
]
