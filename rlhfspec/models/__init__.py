"""Llama-family models: architecture, KV cache, loaders and savers."""
