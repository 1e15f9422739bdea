"""Which work units to run next: the whole grid (``full``), the lazy cascade, or sequential rounds; and
what is finished.

Pure Python and numpy: no Ray, no torch, no formulas. The cascade's stop rule arrives as a callback,
so this layer never needs to know how a certificate is computed. Finished rows leave as soon as they
are complete; the planner keeps only their keys (a full ImageNet run has 300,000 rows of 1,000
counts), plus, in cascade mode, the counts of a level until its other phase arrives.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..units import PHASES, WorkUnit, budget_units

__all__ = ["Planner", "SequentialPlanner", "RowKey", "FinishedRow", "StopRule", "SequentialRule", "Selector"]

RowKey = tuple[int, int, str]  # (image_id, sigma_index, phase)
# Given an image and a σ index with both phases complete, does the cascade stop there?
StopRule = Callable[[int, int, np.ndarray, np.ndarray], bool]


@dataclass(frozen=True)
class FinishedRow:
    image_id: int
    sigma_index: int
    phase: str
    counts: np.ndarray
    round: int = 0  # sequential runs: the estimation round this row holds (its own counts only)
    seq_continue: bool | None = None  # sequential runs: the stop rule's decision after this round


@dataclass
class _Span:
    """Consecutive chunks of one (image, σ, phase), issued as units only when taken: a queue of spans is
    as long as the rows it plans, not their units (sequential ImageNet in audit mode would hold about
    40 million units in its last round)."""

    image_id: int
    sigma_index: int
    phase: str
    first: int  # the next chunk index to issue
    stop: int  # one past the last
    size: int  # samples per chunk
    last_size: int  # samples of chunk ``stop - 1``

    def next_unit(self) -> WorkUnit:
        size = self.last_size if self.first == self.stop - 1 else self.size
        return WorkUnit(self.image_id, self.sigma_index, self.phase, self.first, size)


class _UnitQueue:
    """The queue both planners share: units go out in order, failed ones come back to the front, and
    a unit's counts are accepted once (a retried task that also finished late is not counted twice).
    Whether a unit is done is the planner's to say (``_is_done``) from the rows it keeps, so the queue
    holds no set of every unit ever finished."""

    def __init__(self) -> None:
        self._queue: deque[WorkUnit | _Span] = deque()
        self.samples_planned = 0
        self.samples_done = 0

    def _push_span(self, image: int, s: int, phase: str, first: int, count: int, size: int, last_size: int) -> None:
        """Chunks ``first … first + count - 1`` of (image, σ index, phase): ``size`` samples each, the last
        ``last_size``."""
        self._queue.append(_Span(image, s, phase, first, first + count, size, last_size))
        self.samples_planned += size * (count - 1) + last_size

    def _push_budget(self, image: int, s: int, phase: str, n: int, chunk: int) -> None:
        """The chunks ``split_budget(n, chunk)`` makes, as one span."""
        count = budget_units(n, chunk)
        self._push_span(image, s, phase, 0, count, chunk, n - chunk * (count - 1))

    def _is_done(self, unit: WorkUnit) -> bool:
        raise NotImplementedError

    def _accept(self, unit: WorkUnit) -> bool:
        """Count ``unit``'s samples as done; False when it already was (its counts must then be dropped).
        Called before the planner stores the unit's counts, which is what makes it done."""
        if self._is_done(unit):
            return False
        self.samples_done += unit.n_samples
        return True

    def has_work(self) -> bool:
        return bool(self._queue)

    def take(self, max_samples: int) -> list[WorkUnit]:
        """Units from the front of the queue, about ``max_samples`` samples in all (at least one unit)."""
        out, total = [], 0
        while self._queue:
            head = self._queue[0]
            unit = head.next_unit() if isinstance(head, _Span) else head
            if out and total + unit.n_samples > max_samples:
                break
            if isinstance(head, _Span):
                head.first += 1
                if head.first == head.stop:
                    self._queue.popleft()
            else:
                self._queue.popleft()
            out.append(unit)
            total += unit.n_samples
        return out

    def requeue(self, units: Iterable[WorkUnit]) -> None:
        """Put units whose task failed back at the front."""
        for unit in reversed(list(units)):
            if not self._is_done(unit):
                self._queue.appendleft(unit)


class Planner(_UnitQueue):
    """Issues units incrementally and assembles their chunk counts into finished rows.

    ``existing`` lists the rows already in the store (a resumed run): they are never planned again.
    In cascade mode ``decided`` says, for stored levels (image, σ index), whether the cascade stops
    there, so the walk down resumes where it was without the stored counts; ``half_levels`` holds the
    counts of stored rows whose level still misses its other phase (the decision needs both).
    """

    def __init__(
        self,
        image_ids: Sequence[int],
        num_sigmas: int,
        n0: int,
        n: int,
        chunk: int,
        *,
        mode: str = "full",
        stop_rule: StopRule | None = None,
        existing: Iterable[RowKey] = (),
        decided: Mapping[tuple[int, int], bool] | None = None,
        half_levels: Mapping[RowKey, np.ndarray] | None = None,
    ):
        if mode not in ("full", "cascade"):
            raise ValueError(f"mode must be full or cascade, got {mode!r}")
        if mode == "cascade" and stop_rule is None:
            raise ValueError("cascade mode needs a stop rule")
        super().__init__()
        self.mode = mode
        # A lazy cascade plans a lower σ only once an image is sent down: what is planned is a floor.
        self.total_is_floor = mode == "cascade" and num_sigmas > 1
        self.num_sigmas = num_sigmas
        self.budget = {"selection": n0, "estimation": n}
        self.chunk = chunk
        self.stop_rule = stop_rule
        self.done_rows: set[RowKey] = set(existing)
        self._decided = dict(decided or {})
        self._parts: dict[RowKey, dict[int, np.ndarray]] = {}
        self._level_counts: dict[tuple[int, int], dict[str, np.ndarray]] = {}  # cascade: awaiting the other phase
        for (image, s, phase), counts in (half_levels or {}).items():
            self._level_counts.setdefault((image, s), {})[phase] = np.asarray(counts)
        self._chunks = {p: budget_units(self.budget[p], chunk) for p in PHASES}
        self._open_levels: dict[int, int] = {}  # image -> σ index being sampled (cascade)
        self.finished_images: set[int] = set()
        for image in image_ids:
            if mode == "full":
                for s in range(num_sigmas):
                    self._plan_level(image, s)
                if self._image_complete(image):
                    self.finished_images.add(image)
            else:
                self._advance_cascade(image, num_sigmas - 1)

    # ---- planning ---------------------------------------------------------------------------
    def _level_done(self, image: int, s: int) -> bool:
        return all((image, s, p) in self.done_rows for p in PHASES)

    def _image_complete(self, image: int) -> bool:
        return all(self._level_done(image, s) for s in range(self.num_sigmas))

    def _plan_level(self, image: int, s: int) -> None:
        for phase in PHASES:
            if (image, s, phase) in self.done_rows:
                continue
            self._push_budget(image, s, phase, self.budget[phase], self.chunk)

    def _advance_cascade(self, image: int, s: int) -> None:
        """Walk down from σ index ``s`` through levels already decided; plan the first open one."""
        while s >= 0:
            if (image, s) not in self._decided:
                if self._level_done(image, s):  # stored without a decision: cannot happen via the runner
                    raise ValueError(f"image {image}, σ index {s}: stored level without a cascade decision")
                self._open_levels[image] = s
                self._plan_level(image, s)
                return
            if self._decided[(image, s)] or s == 0:
                self.finished_images.add(image)
                self._open_levels.pop(image, None)
                return
            s -= 1

    # ---- the driver's side ---------------------------------------------------------------------
    def _is_done(self, unit: WorkUnit) -> bool:
        row = (unit.image_id, unit.sigma_index, unit.phase)
        return row in self.done_rows or unit.chunk_index in self._parts.get(row, ())

    def complete(self, unit: WorkUnit, counts: np.ndarray) -> list[FinishedRow]:
        """Record a unit's counts (idempotent); return the rows this completes."""
        if not self._accept(unit):
            return []
        row = (unit.image_id, unit.sigma_index, unit.phase)
        parts = self._parts.setdefault(row, {})
        parts[unit.chunk_index] = np.asarray(counts)
        if len(parts) < self._chunks[unit.phase]:
            return []
        total = np.sum([parts[c] for c in sorted(parts)], axis=0)
        del self._parts[row]
        self.done_rows.add(row)
        image, s = unit.image_id, unit.sigma_index
        if self.mode == "cascade":
            level = self._level_counts.setdefault((image, s), {})
            level[unit.phase] = total
            if len(level) == len(PHASES):
                del self._level_counts[(image, s)]
                self._decided[(image, s)] = bool(self.stop_rule(image, s, level["selection"], level["estimation"]))
                if self._open_levels.get(image) == s:
                    self._advance_cascade(image, s)
        elif self._image_complete(image):
            self.finished_images.add(image)
        return [FinishedRow(image, s, unit.phase, total)]


# Given σ index and the cumulative counts of ĉ at looks 1..k, sample round k+1?
SequentialRule = Callable[[int, list[int]], bool]
# The candidate class from a complete selection row (dense counts).
Selector = Callable[[np.ndarray], int]


@dataclass
class _Pair:
    """One (image, σ) of a sequential run."""

    selection: dict[int, np.ndarray] | None  # chunk -> counts, until complete (then None)
    c_hat: int | None = None
    history: list[int] | None = None  # cumulative count of ĉ at each decided look
    round: int = 0  # the round being sampled (1-based); 0 before the first
    parts: dict[int, np.ndarray] | None = None  # chunk -> counts of the current round
    waiting: list[tuple[int, np.ndarray]] | None = None  # complete rounds awaiting the selection
    done: bool = False


class SequentialPlanner(_UnitQueue):
    """Rounds of whole units for every (image, σ), decided one complete round at a time.

    Round k of a pair is the estimation chunks between looks k−1 and k (each ``unit`` samples, the
    same keys and seeds as a fixed-n run with chunk = unit). When a round is complete the ``rule``
    sees the cumulative counts of ĉ at every look so far and says whether to sample the next one;
    only complete rounds are decided, so completion order and timing never change a row. The
    finished row carries its own round's counts and the decision. With ``audit`` every pair is
    sampled to the last look whatever the rule says (the decisions are still recorded).
    ``resume`` maps (image, σ index) to what the store holds: (ĉ or None, cumulative counts at the
    stored looks, selection stored?, the stored decision after the last stored round). A stored
    decision is never re-taken. The planner holds integers per pair, not count vectors.
    """

    total_known = False

    def __init__(
        self,
        image_ids: Sequence[int],
        num_sigmas: int,
        n0: int,
        chunk: int,
        looks: Sequence[int],
        unit: int,
        *,
        select: Selector,
        rule: SequentialRule,
        audit: bool = False,
        resume: Mapping[tuple[int, int], tuple[int | None, list[int], bool, bool | None]] | None = None,
    ):
        if any(n % unit for n in looks):
            raise ValueError("every look must be a whole number of units")
        super().__init__()
        self.num_sigmas = num_sigmas
        self.n0, self.chunk, self.unit = n0, chunk, unit
        self.looks = [int(n) for n in looks]
        self.select, self.rule, self.audit = select, rule, audit
        self._sel_chunks = budget_units(n0, chunk)
        self._pairs: dict[tuple[int, int], _Pair] = {}
        self._open: dict[int, int] = {}  # image -> pairs still open
        self.finished_images: set[int] = set()
        resume = resume or {}
        for image in image_ids:
            self._open[image] = 0
            for s in range(num_sigmas):
                c_hat, history, sel_stored, decision = resume.get((image, s), (None, [], False, None))
                pair = _Pair(selection={}, c_hat=c_hat, history=list(history), round=len(history))
                self._pairs[(image, s)] = pair
                if not sel_stored:
                    self._push_budget(image, s, "selection", n0, chunk)
                else:
                    pair.selection = None  # stored: a late unit of it is done
                if history and not self._continues(s, pair, decision):
                    pair.done = True
                    continue
                self._open[image] += 1
                self._next_round(image, s, pair)
            if self._open[image] == 0:
                self.finished_images.add(image)

    # ---- planning ---------------------------------------------------------------------------
    def _continues(self, s: int, pair: _Pair, stored: bool | None) -> bool:
        if len(pair.history) >= len(self.looks):
            return False
        if self.audit:
            return True
        return bool(stored) if stored is not None else bool(self.rule(s, list(pair.history)))

    def _next_round(self, image: int, s: int, pair: _Pair) -> None:
        pair.round += 1
        pair.parts = {}
        start = 0 if pair.round == 1 else self.looks[pair.round - 2]
        first, stop = start // self.unit, self.looks[pair.round - 1] // self.unit
        self._push_span(image, s, "estimation", first, stop - first, self.unit, self.unit)

    @property
    def open_images(self) -> int:
        return sum(1 for n in self._open.values() if n > 0)

    # ---- the driver's side ---------------------------------------------------------------------
    def _is_done(self, unit: WorkUnit) -> bool:
        pair = self._pairs[(unit.image_id, unit.sigma_index)]
        if unit.phase == "selection":
            return pair.selection is None or unit.chunk_index in pair.selection
        rounds = len(pair.history) + len(pair.waiting or [])  # complete rounds: their units are all done
        return (rounds > 0 and unit.chunk_index * self.unit < self.looks[rounds - 1]) or (
            unit.chunk_index in (pair.parts or {})
        )

    def complete(self, unit: WorkUnit, counts: np.ndarray) -> list[FinishedRow]:
        """Record a unit's counts (idempotent); return the rows this completes."""
        if not self._accept(unit):
            return []
        image, s = unit.image_id, unit.sigma_index
        pair = self._pairs[(image, s)]
        rows: list[FinishedRow] = []
        if unit.phase == "selection":
            pair.selection[unit.chunk_index] = np.asarray(counts)
            if len(pair.selection) == self._sel_chunks:
                total = np.sum([pair.selection[c] for c in sorted(pair.selection)], axis=0)
                pair.selection = None
                pair.c_hat = int(self.select(total))
                rows.append(FinishedRow(image, s, "selection", total))
                for k, round_counts in pair.waiting or []:
                    rows += self._decide(image, s, pair, k, round_counts)
                pair.waiting = None
            return rows
        pair.parts[unit.chunk_index] = np.asarray(counts)
        start = 0 if pair.round == 1 else self.looks[pair.round - 2]
        if len(pair.parts) < (self.looks[pair.round - 1] - start) // self.unit:
            return rows
        round_counts = np.sum([pair.parts[c] for c in sorted(pair.parts)], axis=0)
        pair.parts = None
        if pair.c_hat is None:  # the round is complete before the selection: decide when it is
            pair.waiting = (pair.waiting or []) + [(pair.round, round_counts)]
            return rows
        return rows + self._decide(image, s, pair, pair.round, round_counts)

    def _decide(self, image: int, s: int, pair: _Pair, k: int, round_counts: np.ndarray) -> list[FinishedRow]:
        previous = pair.history[-1] if pair.history else 0
        pair.history.append(previous + int(round_counts[pair.c_hat]))
        proceed = len(pair.history) < len(self.looks) and bool(self.rule(s, list(pair.history)))
        row = FinishedRow(image, s, "estimation", round_counts, round=k, seq_continue=proceed)
        if proceed or (self.audit and len(pair.history) < len(self.looks)):
            self._next_round(image, s, pair)
        else:
            pair.done = True
            self._open[image] -= 1
            if self._open[image] == 0:
                self.finished_images.add(image)
        return [row]
