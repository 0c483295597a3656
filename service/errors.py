"""Domain errors raised by the core; `service.main` maps each to one HTTP problem type.

FeatureMapError                  (every one may carry `loc`, the request field at fault)
 ├── ImageDecodeError            the upload is not a readable image
 │    └── UnsupportedMediaError  a readable file, but not a format we accept
 ├── PipelineSpecError           the spec is well-typed but means nothing runnable
 ├── LimitExceededError          the request would exceed a configured limit
 ├── DigitError                  the image or pixels cannot be read as one digit
 ├── UnknownModelError           no model of that name
 │    └── NoFeatureMapsError     the model has no convolutional layers to show
 ├── ModelsLoadingError          the models are not loaded yet (retry shortly)
 ├── OverloadedError             too many requests in flight and queued (retry shortly)
 ├── ComputeTimeoutError         the work passed the per-request compute limit
 ├── RequestTimeoutError         the client sent its body too slowly
 ├── UnauthorizedError           an API key is required and missing or wrong
 ├── DeviceUnavailableError      the requested device is not present
 └── InferenceRequestError       an Open Inference Protocol request that is malformed or does not fit the model
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class FieldIssue:
    """One problem with one field of a request, `loc` being its path (`("layers", 0, "size")`)."""

    loc: Loc
    msg: str


class FeatureMapError(Exception):
    """Base of every error the core raises on purpose; `loc` names the request field at fault, if one is."""

    def __init__(self, detail: str, loc: Loc | None = None) -> None:
        self.loc = loc
        super().__init__(detail)


class ImageDecodeError(FeatureMapError):
    """The uploaded bytes could not be decoded as an image."""


class UnsupportedMediaError(ImageDecodeError):
    """The upload is in a format (or content type) the service does not read."""


class PipelineSpecError(FeatureMapError):
    """The pipeline spec cannot run; `issues` says where and why."""

    def __init__(self, issues: Sequence[FieldIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(f"{format_loc(i.loc)}: {i.msg}" for i in self.issues), self.issues[0].loc)

    @classmethod
    def at(cls, loc: Loc, msg: str) -> PipelineSpecError:
        return cls([FieldIssue(loc, msg)])


class LimitExceededError(FeatureMapError):
    """The request would exceed a configured limit (size, pixels, output elements...)."""


class DigitError(FeatureMapError):
    """The input cannot be read as one digit (blank, wrong size, bad pixel values); `loc` names the field."""


class UnknownModelError(FeatureMapError):
    """No model is registered under the requested name; `loc` is set when a body field named it."""


class NoFeatureMapsError(UnknownModelError):
    """The model exists but has no convolutional layers to show."""


class ModelsLoadingError(FeatureMapError):
    """The models are still loading at start-up."""


class OverloadedError(FeatureMapError):
    """A bound that protects the server refused the request for now; `retry_after` is in seconds, and `reason` names
    the bound (one of `REFUSAL_REASONS`, for the metrics)."""

    def __init__(self, detail: str, reason: str, retry_after: int = 1) -> None:
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(detail)


# Why a request was refused with 503 (`OverloadedError.reason`): every compute slot busy and the queue full; no slot
# free within the queue wait; too many single predictions waiting for a batch; the worker's budget for request
# bodies, or for answers waiting to be sent, full.
REFUSAL_REASONS = ("queue_full", "queue_wait", "batch_queue_full", "request_bodies", "responses")


class ComputeTimeoutError(FeatureMapError):
    """The request's work passed the configured compute time limit and was stopped."""


class RequestTimeoutError(FeatureMapError):
    """The request body did not arrive within the configured time."""


class UnauthorizedError(FeatureMapError):
    """An API key is required and the request has none, or a wrong one."""


class DeviceUnavailableError(FeatureMapError):
    """The requested compute device is not present; `available` lists those that are."""

    def __init__(self, requested: str, available: Sequence[str], why: str | None = None) -> None:
        self.requested = requested
        self.available = tuple(available)
        because = f" ({why})" if why else ""
        detail = f"device {requested!r} is not available here{because}; available: {', '.join(self.available)}"
        super().__init__(detail, ("device",))


class InferenceRequestError(FeatureMapError):
    """An Open Inference Protocol (/v2) request is malformed or does not fit the model: input name, datatype,
    shape, data, binary framing or requested outputs; `loc` names the field (`inputs[0].shape`), and the detail
    starts with it, since protocol clients show the detail alone."""

    def __init__(self, detail: str, loc: Loc | None = None) -> None:
        super().__init__(f"{format_loc(loc)}: {detail}" if loc else detail, loc)


def format_loc(loc: Loc) -> str:
    """`("layers", 0, "filters", 1, "kernel")` -> `layers[0].filters[1].kernel`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
