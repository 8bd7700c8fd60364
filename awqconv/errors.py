"""The awqconv error hierarchy.

Every message says what is wrong, where, and how to fix it. The library raises; only
``cli.py`` turns these into exit codes (1 for errors, 2 for usage).
"""

from __future__ import annotations


class AwqconvError(Exception):
    """Base class: a problem the user can fix, reported as one clear line."""


class InputError(AwqconvError):
    """A model path, file or option that cannot be used as given."""


class UsageError(InputError):
    """An option value that can never work (bad device, length, format name): exit 2, like click's."""


class UnsupportedArchitecture(AwqconvError):
    """The model's architecture has no AWQ mapping (or no writer for a format)."""


class ShapeError(AwqconvError):
    """A tensor's shape breaks a rule (group size, packing width, ...)."""


class FormatConstraintError(AwqconvError):
    """A target format cannot hold this quantization (bits, group size, dtype)."""


class CalibrationError(AwqconvError):
    """Calibration data is missing or the search met NaN/inf values."""


class OutputExistsError(AwqconvError):
    """The output directory is not empty and --overwrite was not given."""


class CorruptFileError(AwqconvError):
    """A checkpoint file is truncated, unreadable or inconsistent with its manifest."""
