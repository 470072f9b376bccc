"""Errors that end a command with a one-line message naming the cause and the path."""


class ExportError(Exception):
    """Base class. ``str(err)`` is the one line a user sees."""

    exit_code = 1


class ConfigError(ExportError):
    """The config file or the command line is wrong (exit 2)."""

    exit_code = 2


class PipelineError(ExportError):
    """A stage failed; nothing was published (exit 1)."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, incomplete, corrupt or of another model."""


class ValidationError(PipelineError):
    """The staged SavedModel failed a check of the validation gate."""


class PublishError(PipelineError):
    """A version could not be claimed or promoted."""
