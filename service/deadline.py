"""A per-request compute deadline that long-running core loops check between steps (cooperative timeout)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.errors import ComputeTimeoutError


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() by which the work must be done
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def check(self, doing: str) -> None:
        """Raise `ComputeTimeoutError` once the deadline has passed; `doing` says where the work stopped."""
        if time.monotonic() > self.at:
            raise ComputeTimeoutError(f"the request's work passed its {self.seconds:g} s limit while {doing}")


def check(deadline: Deadline | None, doing: str) -> None:
    if deadline is not None:
        deadline.check(doing)
