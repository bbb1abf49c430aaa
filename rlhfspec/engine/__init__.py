"""One generation instance: live samples, prefill, decode and speculative steps, sampling, drafters."""
