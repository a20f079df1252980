"""Figures (matplotlib, Agg backend): one module per family of commands.
Uses matplotlib and numpy only: callers pass plain arrays."""
