"""Errors a user can act on. The CLI prints the message on one line and exits with `exit_code`."""


class SdcliError(Exception):
    """Base class: a failure with a message that says what is wrong and what to do."""

    exit_code = 1


class UsageError(SdcliError):
    """Bad arguments or options (an unknown sampler, a size that is not a multiple of 8, ...)."""

    exit_code = 2


class CheckpointError(SdcliError):
    """A model file that is missing, unreadable, unsafe or not a layout we know."""


class DownloadError(SdcliError):
    """A download that failed (network, access, checksum, offline); the message says what to do."""


class ImageError(SdcliError):
    """An input image or mask that cannot be read or used."""


class WeightsDirError(SdcliError):
    """A weights folder that cannot be found (no home directory) or written (read-only, permissions)."""


class LoraError(SdcliError):
    """A LoRA file that cannot be read, is in a form we cannot apply, or does not fit the model."""
