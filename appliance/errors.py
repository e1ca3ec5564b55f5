"""Exceptions raised by the appliance.

Every error derives from ``ApplianceError`` and is grouped by what the caller
can do::

    ApplianceError
    ├── SetupError              the operator must fix something before start
    │   ├── ConfigError             the configuration file is missing or invalid
    │   ├── DataDirError            the data directory cannot be created or written
    │   ├── ModelNotFoundError      no GGUF file at the configured path
    │   ├── ModelManifestError      a models/*.json manifest is invalid
    │   ├── ModelChecksumError      a model file differs from its manifest in size or SHA-256
    │   └── ModelLoadError          llama.cpp could not load the file
    ├── StoreError              SQLite failed (disk full, corrupt file)
    ├── AttemptTimeoutError     an activity attempt outlived its policy (appliance/retry.py)
    ├── ManualRetryError        `appliance retry` named no dead record (appliance/retry.py)
    ├── ControlError            the control socket cannot be reached or a command failed
    ├── GrammarError            a JSON schema uses a feature the generator rejects
    ├── InferenceError          one model call failed; retried by its policy
    │   └── InvalidOutputError      output did not parse or validate
    └── UploadError             a batch was not accepted by the sink
        ├── TransientUploadError    retry later (429, 5xx, network)
        └── PermanentUploadError    retrying the same batch cannot succeed (4xx)
"""

from __future__ import annotations

from pathlib import Path


class ApplianceError(Exception):
    """Root of every error raised by the appliance package."""


class SetupError(ApplianceError):
    """A precondition for starting is not met; the message gives the fix."""


class ConfigError(SetupError):
    """The configuration file is missing, not TOML, or has invalid keys or values."""


class ControlError(ApplianceError):
    """The daemon's control socket is unreachable, or a command through it failed."""


class DataDirError(SetupError):
    """The data directory cannot be created or written.

    Attributes:
        path: the directory.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class ModelNotFoundError(SetupError):
    """No model file exists at the configured path.

    Attributes:
        path: the missing path, or None when no default model is installed.
    """

    def __init__(self, message: str, path: Path | None) -> None:
        super().__init__(message)
        self.path = path


class ModelManifestError(SetupError):
    """A model manifest cannot be parsed or has an invalid field.

    Attributes:
        path: the manifest file.
        field: the offending key, or None when the whole file is unreadable.
    """

    def __init__(self, message: str, path: Path, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.field = field


class ModelChecksumError(SetupError):
    """A model file does not match the size or SHA-256 in its manifest.

    Attributes:
        path: the checked file.
        expected: the manifest's value (hex digest or size in bytes, as text).
        actual: the value computed from the file, in the same form.
    """

    def __init__(self, message: str, path: Path, expected: str, actual: str) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


class ModelLoadError(SetupError):
    """llama.cpp failed to load a model file.

    Attributes:
        path: the model file.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class StoreError(ApplianceError):
    """A SQLite operation failed.

    Attributes:
        path: the database file.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class GrammarError(ApplianceError):
    """A JSON schema cannot be turned into a grammar.

    Attributes:
        field: the JSON pointer of the offending schema node.
    """

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class InferenceError(ApplianceError):
    """A model call failed for one record.

    Attributes:
        record_id: the record being processed, when known.
    """

    def __init__(self, message: str, record_id: str | None = None) -> None:
        super().__init__(message)
        self.record_id = record_id


class InvalidOutputError(InferenceError):
    """Model output did not parse as JSON or failed schema validation."""


class UploadError(ApplianceError):
    """A batch was not accepted by the sink.

    Attributes:
        batch_id: the batch, which is also its Idempotency-Key.
        status: the HTTP status, or None for network errors.
    """

    def __init__(self, message: str, batch_id: str, status: int | None = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.status = status


class TransientUploadError(UploadError):
    """The sink may accept the same batch later.

    Attributes:
        retry_after: seconds the sink asked to wait, when it said so.
    """

    def __init__(
        self,
        message: str,
        batch_id: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, batch_id, status)
        self.retry_after = retry_after


class PermanentUploadError(UploadError):
    """The sink rejected the batch in a way that resending cannot fix."""
