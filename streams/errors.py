"""The one error type of the ``streams`` package."""


class StreamError(ValueError):
    """Bad stream input: unknown stream or task, a missing or malformed data file, an empty split.

    Every message names the offending file, task or value and says how to fix it.
    """


class TaskNotFoundError(StreamError):
    """A task folder does not exist under the data root (the message lists the tasks that do)."""
