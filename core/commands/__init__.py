"""Command groups of `python -m core`, one module per group."""
