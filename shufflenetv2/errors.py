"""Errors meant for users: the CLI prints them as one paragraph, without a traceback."""


class ShuffleNetV2Error(Exception):
    """Base class: the message says what was wrong and what to do about it."""


class CheckpointError(ShuffleNetV2Error, ValueError):
    """A weight file that cannot be read, or whose tensors do not fit the model."""


class DownloadError(ShuffleNetV2Error, OSError):
    """A pretrained file that could not be fetched or failed its hash check."""


class DataError(ShuffleNetV2Error):
    """A data directory, split or image that cannot be used."""


class StorageError(ShuffleNetV2Error, OSError):
    """A file the run must write cannot be written (read-only folder, full disk, no permission)."""


class DirectoryInUse(ShuffleNetV2Error):
    """Another training run holds the run or checkpoint folder (``fileio.lock_run_directory``)."""
