"""Domain errors raised by the core; `service.main` maps each to one HTTP problem type.

FeatureMapError
 ├── ImageDecodeError            the upload is not a readable image
 │    └── UnsupportedMediaError  a readable file, but not a format we accept
 ├── PipelineSpecError           the spec is well-typed but means nothing runnable
 ├── LimitExceededError          the request would exceed a configured limit
 ├── UnknownModelError           no model of that name
 └── DeviceUnavailableError      the requested device is not present
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
    """Base of every error the core raises on purpose."""


class ImageDecodeError(FeatureMapError):
    """The uploaded bytes could not be decoded as an image."""


class UnsupportedMediaError(ImageDecodeError):
    """The upload is in a format (or content type) the service does not read."""


class PipelineSpecError(FeatureMapError):
    """The pipeline spec cannot run; `issues` says where and why."""

    def __init__(self, issues: Sequence[FieldIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("; ".join(f"{format_loc(i.loc)}: {i.msg}" for i in self.issues))

    @classmethod
    def at(cls, loc: Loc, msg: str) -> PipelineSpecError:
        return cls([FieldIssue(loc, msg)])


class LimitExceededError(FeatureMapError):
    """The request would exceed a configured limit (size, pixels, output elements...)."""

    def __init__(self, detail: str, loc: Loc | None = None) -> None:
        self.loc = loc
        super().__init__(detail)


class UnknownModelError(FeatureMapError):
    """No model is registered under the requested name."""


class DeviceUnavailableError(FeatureMapError):
    """The requested compute device is not present; `available` lists those that are."""

    def __init__(self, requested: str, available: Sequence[str]) -> None:
        self.requested = requested
        self.available = tuple(available)
        super().__init__(f"device {requested!r} is not available here; available: {', '.join(self.available)}")


def format_loc(loc: Loc) -> str:
    """`("layers", 0, "filters", 1, "kernel")` -> `layers[0].filters[1].kernel`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
