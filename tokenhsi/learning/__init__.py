"""Agents for the built-in tasks (rl_games based)."""
