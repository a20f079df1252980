"""Figures (matplotlib, Agg backend): one module per family of commands."""
