"""Training entry points and their logic."""
