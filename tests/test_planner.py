"""The planner: what is issued, what is finished, and that nothing counts twice."""

import numpy as np

from raysmooth.distributed import Planner


def _counts(total, cls=0, num_classes=3):
    c = np.zeros(num_classes, dtype=np.int64)
    c[cls] = total
    return c


def test_full_mode_plans_every_sigma_phase_and_chunk():
    p = Planner([10, 11], num_sigmas=3, n0=100, n=250, chunk=100)
    units = p.take(10**9)
    assert len(units) == 2 * 3 * (1 + 3)  # selection in one chunk, estimation in 100+100+50
    assert sorted({u.n_samples for u in units if u.phase == "estimation"}) == [50, 100]
    assert p.samples_planned == 2 * 3 * 350


def test_rows_finish_when_all_chunks_are_in_and_a_repeat_is_ignored():
    p = Planner([0], num_sigmas=1, n0=10, n=30, chunk=10)
    units = p.take(10**9)
    est = [u for u in units if u.phase == "estimation"]
    assert p.complete(est[0], _counts(10)) == []
    assert p.complete(est[0], _counts(10)) == []  # the same unit again: not counted twice
    assert p.complete(est[1], _counts(10)) == []
    rows = p.complete(est[2], _counts(10))
    assert len(rows) == 1 and rows[0].counts[0] == 30
    assert 0 not in p.finished_images
    p.complete(units[0], _counts(10))
    assert 0 in p.finished_images


def test_requeued_units_come_first_and_finished_ones_are_dropped():
    p = Planner([0, 1], num_sigmas=1, n0=10, n=10, chunk=10)
    first = p.take(20)
    p.complete(first[0], _counts(10))
    p.requeue(first)
    again = p.take(10)
    assert again == [first[1]]


def test_take_groups_units_up_to_the_sample_budget():
    p = Planner(list(range(5)), num_sigmas=1, n0=100, n=100, chunk=100)
    assert len(p.take(450)) == 4
    assert len(p.take(50)) == 1  # at least one unit even above the budget


def test_cascade_starts_at_the_largest_sigma_and_descends_only_when_open():
    stops = {(0, 2): True, (1, 2): False, (1, 1): False}

    def rule(image, s, sel, est):
        return stops.get((image, s), True)

    p = Planner([0, 1], num_sigmas=3, n0=10, n=10, chunk=10, mode="cascade", stop_rule=rule)
    units = p.take(10**9)
    assert {u.sigma_index for u in units} == {2}
    for u in units:
        p.complete(u, _counts(10))
    assert 0 in p.finished_images and 1 not in p.finished_images
    nxt = p.take(10**9)
    assert {(u.image_id, u.sigma_index) for u in nxt} == {(1, 1)}
    for u in nxt:
        p.complete(u, _counts(10))
    last = p.take(10**9)
    assert {(u.image_id, u.sigma_index) for u in last} == {(1, 0)}
    for u in last:
        p.complete(u, _counts(10))
    assert p.finished_images == {0, 1} and not p.has_work()


def _resumed_cascade(existing, decided, **kw) -> Planner:
    """One image, three σ, a cascade that never stops by itself, resumed from ``existing`` rows."""
    return Planner(
        [0],
        num_sigmas=3,
        n0=10,
        n=10,
        chunk=10,
        mode="cascade",
        stop_rule=lambda *a: False,
        existing=existing,
        decided=decided,
        **kw,
    )


def test_resume_plans_only_missing_rows_and_replays_cascade_decisions():
    existing = {(0, 2, "selection"), (0, 2, "estimation")}
    full = Planner([0], num_sigmas=3, n0=10, n=10, chunk=10, existing=existing)
    assert {u.sigma_index for u in full.take(10**9)} == {0, 1}
    casc = _resumed_cascade(existing, {(0, 2): False})
    assert {u.sigma_index for u in casc.take(10**9)} == {1}
    done = _resumed_cascade(existing, {(0, 2): True})
    assert not done.has_work() and done.finished_images == {0}


def test_the_planner_keeps_keys_not_counts_of_finished_rows():
    p = Planner([0, 1], num_sigmas=1, n0=10, n=10, chunk=10)
    for u in p.take(10**9):
        p.complete(u, _counts(10))
    assert p.done_rows == {(0, 0, "selection"), (0, 0, "estimation"), (1, 0, "selection"), (1, 0, "estimation")}
    assert not p._parts and not p._level_counts


def test_a_cascade_level_interrupted_between_its_phases_is_decided_when_the_other_phase_arrives():
    # Stored: level 2 decided "go on"; level 1 has its selection row only.
    existing = {(0, 2, "selection"), (0, 2, "estimation"), (0, 1, "selection")}
    p = _resumed_cascade(existing, {(0, 2): False}, half_levels={(0, 1, "selection"): _counts(10)})
    units = p.take(10**9)
    assert [(u.sigma_index, u.phase) for u in units] == [(1, "estimation")]
    p.complete(units[0], _counts(10))
    assert [(u.sigma_index, u.phase) for u in p.take(10**9)] == [(0, "selection"), (0, "estimation")]


def test_a_unit_of_a_finished_row_that_arrives_again_is_dropped():
    """A retried task that also finished late: its units' row is complete and stored already."""
    p = Planner([0], num_sigmas=1, n0=10, n=20, chunk=10)
    units = p.take(10**9)
    rows = [r for u in units for r in p.complete(u, _counts(u.n_samples))]
    assert len(rows) == 2 and p.samples_done == 30
    assert all(p.complete(u, _counts(u.n_samples)) == [] for u in units)
    p.requeue(units)
    assert p.samples_done == 30 and not p.has_work()


def test_the_planner_holds_rows_not_units_so_a_huge_budget_plans_at_once():
    """Each row's chunks are one span, issued as units only when a task takes them: 1,000 images × 3 σ
    at n = 10^12 in chunks of 10,000 (3·10^11 units) plan in a few MB (listing units would not fit)."""
    import tracemalloc

    tracemalloc.start()
    p = Planner(list(range(1000)), num_sigmas=3, n0=100, n=10**12, chunk=10_000)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert held < 5e6 and p.samples_planned == 1000 * 3 * (100 + 10**12)
    first = p.take(25_000)
    assert [(u.phase, u.chunk_index, u.n_samples) for u in first] == [
        ("selection", 0, 100),
        ("estimation", 0, 10_000),
        ("estimation", 1, 10_000),
    ]
