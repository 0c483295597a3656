"""The bench's rounds: every other round visits the servers in reverse, and results stay in the servers' order."""

from __future__ import annotations

import pytest

from bench.serve import Load, in_turn, ratios_to_first


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


def test_each_rounds_ratio_is_to_the_floor_of_that_same_round() -> None:
    def load(rps: float) -> Load:
        return Load(rps=rps, p50_ms=0.0, p99_ms=0.0, errors=0)

    # Round by round the service is 0.5, 0.6 and 0.7 of the floor. The ratio of the medians (1,750 / 2,500) would
    # be 0.70, and a ratio to another round's floor anything from 0.29 (1,000 / 3,500) to 1.05 (2,100 / 2,000).
    rounds = [[load(2000), load(1000)], [load(3500), load(2100)], [load(2500), load(1750)]]
    assert ratios_to_first(rounds, 1) == pytest.approx((0.6, 0.5, 0.7))
    assert ratios_to_first(rounds, 0) == (1.0, 1.0, 1.0)
