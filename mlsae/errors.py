"""Errors the CLI turns into one line on stderr (no traceback), and the one-line form of any
exception. Imports nothing from mlsae: every module may use it."""

import re

_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def python_wording(message: str) -> str:
    """A CLI message as a Python caller reads it: `--ctx-len` becomes `ctx_len` (the keyword
    or config field), except inside backticks, where a suggested command line stays as is."""
    parts = message.split("`")
    parts[::2] = [_FLAG.sub(lambda m: m.group(1).replace("-", "_"), p) for p in parts[::2]]
    return "`".join(parts)


class UserError(ValueError):
    """Bad input from the user: a flag, a path, a dataset, a checkpoint. A ValueError, so
    Python callers can catch it as one. Messages are written as the CLI says them (`--k`);
    `str(e)` names the keyword instead (`k`), `cli_message()` keeps the flag (mlsae.cli)."""

    def cli_message(self) -> str:
        """The message as the command line says it."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return python_wording(self.cli_message())


class OptionError(UserError):
    """A bad value of one config field. `message` names the field as `{option}`: a Python
    caller reads the field (`TrainConfig.log 'x': ...`), the CLI the flag (`--log 'x': ...`)."""

    def __init__(self, field: str, message: str):
        self.field, self.template = field, message  # field: `Class.name`
        super().__init__(message.replace("{option}", field))

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def flag(self) -> str:
        """The field's command-line flag (`TrainConfig.log` -> `--log`)."""
        return "--" + self.field.rsplit(".", 1)[-1].replace("_", "-")

    def cli_message(self) -> str:
        """The message naming the flag, as the command line prints it."""
        return self.template.replace("{option}", self.flag)


class NotFound(UserError, FileNotFoundError):
    """A checkpoint, folder or file that does not exist (also a FileNotFoundError)."""


class TrainingDiverged(RuntimeError):
    """Activations or loss became non-finite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, permissions); the previous one is kept."""


def first_line(e: BaseException | str) -> str:
    """The first line of an exception's message (its type name if it has none), or of a
    text, for wrapping a library's multi-line error into one line for the user."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0]
    return type(e).__name__ if isinstance(e, BaseException) else ""
