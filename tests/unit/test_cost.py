"""Cost meters on a hand-driven clock: conservation (request + idle = price × time) at every moment,
processor sharing between concurrent work, attribution by weight, counters that never go down."""

from __future__ import annotations

import threading

import pytest

from services.attention.costs import AttentionCosts
from services.core.cost import BlockMeter, CostMeter, CostTotals, RequestCost


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


PRICE = 3600.0  # USD per hour: 1 USD per second keeps the arithmetic readable


def conserved(totals: CostTotals, seconds: float, usd_per_s: float = 1.0) -> bool:
    return totals.request_usd + totals.idle_usd == pytest.approx(seconds * usd_per_s, rel=1e-9, abs=1e-9)


def test_busy_time_goes_to_keys_by_weight_and_the_rest_is_idle() -> None:
    clock = Clock()
    meter = CostMeter(PRICE, started_at=0.0, clock=clock)
    clock.advance(2.0)  # idle since process start
    with meter.busy({"a": 3, "b": 1}):
        clock.advance(4.0)
    clock.advance(1.0)
    totals = meter.totals()
    assert totals == CostTotals(request_usd=pytest.approx(4.0), idle_usd=pytest.approx(3.0))
    assert meter.take("a") == pytest.approx(3.0) and meter.take("b") == pytest.approx(1.0)
    assert meter.take("a") == 0.0  # taken: forgotten


def test_concurrent_work_shares_the_time_equally() -> None:
    clock = Clock()
    meter = CostMeter(PRICE, started_at=0.0, clock=clock)
    first = meter.open({"a": 1})
    second = meter.open({"b": 1})
    with first:
        clock.advance(1.0)  # a alone: 1 s
        with second:
            clock.advance(2.0)  # both: 1 s each
        clock.advance(1.0)  # a alone again
    first.close()
    second.close()
    assert meter.take("a") == pytest.approx(3.0) and meter.take("b") == pytest.approx(1.0)
    assert conserved(meter.totals(), 4.0)


def test_a_scrape_in_the_middle_of_work_is_exact_and_counters_only_grow() -> None:
    clock = Clock()
    meter = CostMeter(PRICE, started_at=0.0, clock=clock)
    work = meter.open({"a": 1})
    seen = []
    with work:  # one long busy period, scraped three times
        for _ in range(3):
            clock.advance(0.5)
            seen.append(meter.totals())
    clock.advance(0.5)
    work.close()
    seen.append(meter.totals())
    assert [t.request_usd for t in seen] == pytest.approx([0.5, 1.0, 1.5, 1.5])
    assert [t.idle_usd for t in seen] == pytest.approx([0.0, 0.0, 0.0, 0.5])
    assert all(conserved(t, 0.5 * (i + 1)) for i, t in enumerate(seen))
    assert meter.take("a") == pytest.approx(1.5)


def test_open_work_between_busy_periods_is_idle_and_weightless_work_too() -> None:
    clock = Clock()
    meter = CostMeter(PRICE, started_at=0.0, clock=clock)
    step = meter.open({"a": 1})
    for _ in range(3):  # an attention step: busy per layer frame, waiting in between
        with step:
            clock.advance(0.1)
        clock.advance(0.2)
    step.close()
    with meter.busy({}):  # work for nobody
        clock.advance(1.0)
    totals = meter.totals()
    assert totals.request_usd == pytest.approx(0.3) and conserved(totals, 1.9)


def test_many_threads_conserve() -> None:
    meter = CostMeter(PRICE)
    start = meter.totals()

    def work(key: int) -> None:
        for _ in range(200):
            with meter.busy({key: 1, key + 100: 2}):
                pass

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    totals = meter.totals()
    taken = sum(meter.take(k) for i in range(4) for k in (i, i + 100))
    assert taken == pytest.approx(totals.request_usd - start.request_usd, rel=1e-9)
    assert totals.request_usd >= start.request_usd and totals.idle_usd >= start.idle_usd


def test_memory_charges_held_blocks_and_idles_free_ones() -> None:
    clock = Clock()
    meter = BlockMeter(PRICE, total_blocks=10, started_at=0.0, clock=clock)  # 0.1 USD per block-second
    meter.hold(1, 4)
    clock.advance(2.0)
    meter.hold(1, 6)  # grew
    meter.hold(2, 2)
    clock.advance(1.0)
    assert conserved(meter.totals(), 3.0)
    assert meter.release(1) == pytest.approx(0.1 * (4 * 2 + 6 * 1))
    clock.advance(1.0)
    totals = meter.totals()
    assert totals.request_usd == pytest.approx(0.1 * (4 * 2 + 6 + 2 * 2))
    assert conserved(totals, 4.0)
    assert meter.release(2) == pytest.approx(0.4) and meter.release(2) == 0.0


def test_attention_costs_split_the_price_between_memory_and_compute() -> None:
    clock = Clock()
    costs = AttentionCosts(PRICE, memory_share=0.25, total_blocks=4, started_at=0.0, clock=clock)
    costs.hold(7, 4)  # the whole pool
    with costs.compute.busy({7: 5}):
        clock.advance(2.0)
    assert costs.release(7) == pytest.approx(2.0)  # all the memory and all the compute, 2 s
    clock.advance(2.0)
    assert conserved(costs.totals(), 4.0) and costs.totals().request_usd == pytest.approx(2.0)


def test_request_cost_breakdown_sums_to_the_total() -> None:
    cost = RequestCost(prefill_usd=1.0, decode_usd=2.0, attention_usd=0.5, gateway_usd=0.25)
    assert sum(cost.breakdown().values()) == cost.total_usd == 3.75
    assert set(cost.breakdown()) == {"prefill", "decode", "attention", "gateway"}


def test_a_negative_price_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        CostMeter(-1.0)
