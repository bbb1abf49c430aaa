"""Prompt datasets, chat templates and built-in tasks."""
