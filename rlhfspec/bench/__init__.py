"""Benchmarks behind `rlhfspec bench ...`: measured side by side in one process, written to benchmarks/."""
