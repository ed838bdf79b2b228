"""TokenHSI-facing side of the relay: entry point, built-in tasks and agents."""
