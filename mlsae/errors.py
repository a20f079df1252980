"""Errors that the CLI turns into one line on stderr and exit code 2 (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a flag, a path, a dataset, a checkpoint."""


class TrainingDiverged(RuntimeError):
    """Activations or loss became non-finite; the last good checkpoint is kept."""
