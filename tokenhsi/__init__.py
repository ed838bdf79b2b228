"""TokenHSI-facing side of the relay: entry point, built-in tasks and agents (issue 4, in progress)."""
