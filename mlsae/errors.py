"""Errors the CLI turns into one line on stderr (no traceback), and the one-line form of any
exception. Imports nothing from mlsae: every module may use it."""


class UserError(ValueError):
    """Bad input from the user: a flag, a path, a dataset, a checkpoint. A ValueError, so
    Python callers can catch it as one; the CLI prints its message as one line."""

    def cli_message(self) -> str:
        """The message as the command line says it (the same, unless it names an option)."""
        return str(self)


class OptionError(UserError):
    """A bad value of one config field. `message` names the field as `{option}`: a Python
    caller reads the field (`TrainConfig.log 'x': ...`), the CLI the flag (`--log 'x': ...`)."""

    def __init__(self, field: str, message: str):
        self.field, self.template = field, message  # field: `Class.name`
        super().__init__(message.replace("{option}", field))

    @property
    def flag(self) -> str:
        return "--" + self.field.rsplit(".", 1)[-1].replace("_", "-")

    def cli_message(self) -> str:
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
