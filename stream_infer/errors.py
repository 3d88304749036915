"""One exception tree for stream-infer.

    StreamInferError
    ├── ConfigError            a topology file or setting is invalid (names the field)
    │                          or an existing topic cannot serve it (names the topic)
    ├── BrokerError            the broker cannot be reached or refused an operation
    │   └── DeliveryError      a produced record was not acknowledged
    ├── ModelError             a model artifact or its metadata cannot be used
    │   ├── IntegrityError     the artifact's sha256 does not match its metadata
    │   ├── ModelOutputError   a model returned the wrong shape or non-finite values
    │   └── InferenceTimeout   a model call did not return within limits.inference_timeout_s
    ├── ControlError           a control command is rejected (reason code + detail); serving
    │                          is left as it was
    └── InvalidEvent           one input record is not a valid feature event (data, not a crash:
                               it goes to the dead-letter topic with its reason)

Every error carries its context in attributes as well as in its message.
"""

from __future__ import annotations


class StreamInferError(Exception):
    """Base of every error stream-infer raises on purpose."""


class ConfigError(StreamInferError):
    """A topology file or setting is invalid."""

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class BrokerError(StreamInferError):
    """The broker cannot be reached or refused an operation."""

    def __init__(self, message: str, *, bootstrap_servers: str | None = None) -> None:
        self.bootstrap_servers = bootstrap_servers
        super().__init__(message)


class DeliveryError(BrokerError):
    """A produced record was not acknowledged by the broker."""

    def __init__(self, message: str, *, topic: str, key: bytes | None = None) -> None:
        self.topic = topic
        self.key = key
        super().__init__(message)


class ModelError(StreamInferError):
    """A model artifact or its metadata cannot be used."""

    def __init__(self, message: str, *, model: str | None = None, version: str | None = None):
        self.model = model
        self.version = version
        where = f"model {model!r} version {version!r}: " if model else ""
        super().__init__(where + message)


class IntegrityError(ModelError):
    """An artifact's sha256 does not match the one its metadata declares."""


class ModelOutputError(ModelError):
    """A model returned the wrong shape or non-finite values."""


class InferenceTimeout(ModelError):
    """A model call did not return within its time limit, or was refused because too many
    earlier calls of the same version are still hung (``refused``)."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        version: str | None = None,
        timeout_s: float,
        refused: bool = False,
    ) -> None:
        self.timeout_s = timeout_s
        self.refused = refused
        super().__init__(message, model=model, version=version)


class ControlError(StreamInferError):
    """A control command is rejected. ``reason`` is a short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str, *, command_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.command_id = command_id
        super().__init__(f"{reason}: {detail}")


class InvalidEvent(StreamInferError):
    """One record is not a valid feature event. Its reason is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")
