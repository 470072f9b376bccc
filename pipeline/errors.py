"""Errors that end a command with a one-line message naming the cause and the path."""


class ExportError(Exception):
    """Base class. ``str(err)`` is the one line a user sees.

    ``permanent``: no retry of the same task can mend it (a scheduler should
    fail the task at once); the others may pass on a retry (storage, a
    checkpoint still being written, a race lost).
    """

    exit_code = 1
    permanent = False


class ConfigError(ExportError):
    """The config file or the command line is wrong (exit 2)."""

    exit_code = 2
    permanent = True


class PipelineError(ExportError):
    """A stage failed; nothing was published (exit 1)."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, incomplete, corrupt or of another model."""


class ModelMismatchError(CheckpointError):
    """The checkpoint holds another model than the factory builds."""

    permanent = True


class CheckpointMissingError(CheckpointError):
    """The checkpoint asked for does not exist and will not appear (older than the newest one, or
    still nothing after a grace period): a typo in an event or a conf, not something to wait for."""
    permanent = True


class ValidationError(PipelineError):
    """The staged SavedModel failed a check of the validation gate."""

    permanent = True


class ConditionIgnored(PipelineError):
    """The store accepted a conditional write and did not honour the condition (a second create-only
    write of one name succeeded): no retry mends it."""

    permanent = True


class PublishError(PipelineError):
    """A version could not be claimed or promoted."""


class ServingOrderError(PublishError):
    """The version would put a checkpoint out of training order (refused without --allow-outrank)."""

    permanent = True
