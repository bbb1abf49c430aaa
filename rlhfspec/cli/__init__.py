"""The `rlhfspec` command."""
