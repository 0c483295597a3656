"""The bench's rounds: every other round visits the servers in reverse, and results stay in the servers' order."""

from __future__ import annotations

import pytest

from bench.serve import Load, in_turn


@pytest.mark.parametrize(("round_", "visits"), [(0, ["a", "b", "c"]), (1, ["c", "b", "a"]), (2, ["a", "b", "c"])])
def test_rounds_alternate_their_order_and_keep_the_rows(round_: int, visits: list[str]) -> None:
    seen: list[str] = []

    def load(url: str) -> Load:
        seen.append(url)
        return Load(rps=float(ord(url)), p50_ms=0.0, p99_ms=0.0, errors=len(seen))

    loads = in_turn(["a", "b", "c"], round_, load)
    assert seen == visits
    assert [load.rps for load in loads] == [ord("a"), ord("b"), ord("c")]  # each url's own result, in urls' order
    assert [load.errors for load in loads] == [visits.index(url) + 1 for url in "abc"]
