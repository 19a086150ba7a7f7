"""hymamba's exceptions: one hierarchy, so that callers (and the command line) can tell the user's
mistakes from failures and from bugs.

- :class:`HymambaError`: the base of everything hymamba raises on purpose.
- :class:`ConfigError` (also a ``ValueError``): a setting, argument or value that cannot work; the
  message says what was expected, what was found and what to do. The CLI exits with status 2.
- :class:`DataError` (also a ``ValueError``): input data that cannot be used (missing folder, no
  images, wrong classes). Exit status 2.
- :class:`CheckpointError`: a weights file that cannot be read, or does not fit the model; its child
  :class:`WeightsNotFound` (also a ``FileNotFoundError``): official weights not on this machine. Exit 2.
- :class:`KernelUnavailable` (also a ``RuntimeError``): an explicitly requested compiled kernel
  that this machine cannot provide. Exit 1.
- :class:`TrainingError` (also a ``RuntimeError``): a run that cannot go on (e.g. the loss became
  NaN); its last checkpoint is kept. Exit 1.

Anything else that escapes hymamba is a bug and keeps its traceback. This module imports nothing.
"""

__all__ = ["CheckpointError", "ConfigError", "DataError", "HymambaError", "KernelUnavailable", "TrainingError",
           "USAGE_ERRORS", "WeightsNotFound"]


class HymambaError(Exception):
    """Base of the errors hymamba raises on purpose (one-line messages meant for people)."""


class ConfigError(HymambaError, ValueError):
    """A setting or argument that cannot work: what was expected, what was found, what to do."""


class DataError(HymambaError, ValueError):
    """Input data that cannot be used (missing folders, no readable images, mismatched classes)."""


class CheckpointError(HymambaError, RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


class WeightsNotFound(CheckpointError, FileNotFoundError):
    """Weights asked for by name (``pretrained=True``) are not on this machine; hymamba never downloads."""


class KernelUnavailable(HymambaError, RuntimeError):
    """An explicitly requested compiled kernel cannot run here (the message says why and what instead)."""


class TrainingError(HymambaError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the last checkpoint is kept."""


#: errors caused by what the user passed in (the CLI exits 2); other HymambaErrors exit 1
USAGE_ERRORS = (ConfigError, DataError, CheckpointError)
