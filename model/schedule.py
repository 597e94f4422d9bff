"""The three phases' lengths under a wall-clock budget (``--time-budget-s``, ``--schedule-fractions``).

The paper fixes its schedule in steps (tc = 90,000, td = 10,000, t_train = 500,000 at batch 96).
A run with a budget in seconds fixes it in time instead: with fractions ``(f1, f2, f3)`` phase k
gets ``f_k`` of the training time, and its steps follow from the step rate measured on the
hardware at hand. The phases cost different amounts per step (phase 2 runs the generator without
a graph and updates the discriminator; phase 3 runs both updates), so each phase's rate is
measured once it runs and the plan is made again

- when a phase has been timed over ``WARMUP_STEPS`` steps, and over 4x, 16x, ... as many (its
  rate is wall time over steps, so the checkpoints and validations it meets count; the first
  ``SKIP_STEPS`` of a phase are not timed: cuDNN's autotuner and first allocations land there), and
- at each phase boundary, where the time actually left (checkpoints and validations included)
  is shared out again by the fractions of the phases still to run.

A phase not yet measured is priced at ``PRIOR_COST`` times a measured one.

With or without fractions, the run stops after the step past which the next step, the last
checkpoint, validation and export (``reserve_s``) would not fit before the deadline, wherever it
is in the schedule. Pure Python with an injectable clock, so tests drive it with a fake one.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

PHASES = (1, 2, 3)
SKIP_STEPS = 3
WARMUP_STEPS = 10
# Seconds per step of each phase relative to phase 1, before a phase has run, from the networks'
# forward FLOPs at width 1.0 and 256 px (torch.utils.flop_counter): the completion network G = 65
# GFLOP per image, the context discriminator D = 7.8 on an image and its patch. Phase 1 is G's
# forward and backward (3G), phase 2 G's forward without a graph plus D's update on real + fake
# (G + 6D = 0.57 x phase 1), phase 3 both updates and the generator's adversarial pass through D
# (3G + 12D = 1.48 x). Only a first guess: each phase is re-planned once it has been timed.
PRIOR_COST = {1: 1.0, 2: 0.57, 3: 1.48}
# Interior validations of a planned phase 1 (besides the phase ends): a few, not every few steps.
PHASE1_VALIDATIONS = 3
# The least time kept back for the final checkpoint, validation and export.
RESERVE_FLOOR_S = 2.0


@dataclass(frozen=True)
class Schedule:
    """Phase 1 runs steps [0, tc), phase 2 [tc, tc + td), phase 3 [tc + td, t_train)."""

    tc: int
    td: int
    t_train: int

    def __post_init__(self):
        if not (0 <= self.tc and 0 <= self.td and self.tc + self.td <= self.t_train):
            raise ValueError(f"need 0 <= tc, 0 <= td and tc + td <= t_train: {self}")

    def phase(self, step: int) -> int:
        """The phase that runs the update of ``step`` (0-based)."""
        if step < self.tc:
            return 1
        return 2 if step < self.tc + self.td else 3

    @property
    def phase_ends(self) -> set[int]:
        return {s for s in (self.tc, self.tc + self.td, self.t_train) if s > 0}

    def validation_due(self, done: int, inside_done: int) -> bool:
        """Whether a planned run validates after ``done`` steps, ``inside_done`` validations inside
        phase 1 made so far: at each phase end, and at ``PHASE1_VALIDATIONS`` points evenly inside
        phase 1. A point is due once passed, so a re-plan that shortens phase 1 past a point
        validates at the next step instead of skipping it."""
        if done in self.phase_ends:
            return True
        if done >= self.tc or inside_done >= PHASE1_VALIDATIONS:
            return False
        return done >= self.tc * (inside_done + 1) // (PHASE1_VALIDATIONS + 1)

    def stopped_at(self, done: int) -> Schedule:
        """This schedule cut short after ``done`` steps: the phases that had not ended end there."""
        tc = min(self.tc, done)
        return Schedule(tc, min(self.td, done - tc), done)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> the time shares of phases 1, 2 and 3: three numbers >= 0 that sum to 1,
    phase 1's above 0 (a discriminator trained against an untrained generator teaches nothing)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"schedule fractions {text!r}: give three numbers >= 0, e.g. 0.8,0.1,0.1")
    if abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0:
        raise ValueError(f"schedule fractions {text!r}: they must sum to 1, with phase 1's above 0")
    return values  # type: ignore[return-value]


def plan(
    schedule: Schedule,
    step: int,
    remaining_s: float,
    fractions: tuple[float, float, float],
    seconds_per_step: dict[int, float],
    spent_in_phase_s: float = 0.0,
) -> Schedule:
    """The schedule from ``step`` on, given ``remaining_s`` seconds of training left.

    The phase of ``step`` and the later ones share ``remaining_s + spent_in_phase_s`` (what the
    current phase has already used counts against its own share) in proportion to their fractions;
    each gets the whole steps its share buys at its ``seconds_per_step``. Earlier phases are over
    and keep their lengths.
    """
    current = schedule.phase(step)
    later = [k for k in PHASES if k >= current]
    weight = sum(fractions[k - 1] for k in later)
    pool = max(0.0, remaining_s) + max(0.0, spent_in_phase_s)
    steps = {}
    for k in later:
        share = pool * fractions[k - 1] / weight if weight > 0 else 0.0
        if k == current:
            share -= spent_in_phase_s
        steps[k] = max(0, math.floor(share / seconds_per_step[k])) if share > 0 else 0
    if current == 1:
        tc = step + steps[1]
        td = steps[2]
    elif current == 2:
        tc = schedule.tc
        td = step - schedule.tc + steps[2]
    else:
        tc, td = schedule.tc, schedule.td
        return Schedule(tc, td, step + steps[3])
    return Schedule(tc, td, tc + td + steps[3])


class BudgetPlanner:
    """Rank 0's schedule under a deadline: call ``after_step`` once per training step.

    ``deadline`` is a ``clock()`` time (wall-clock seconds, so a restarted worker keeps the run's
    deadline); ``fractions`` None keeps the schedule's lengths and only stops at the deadline.
    """

    def __init__(
        self,
        schedule: Schedule,
        start_step: int,
        deadline: float,
        fractions: tuple[float, float, float] | None = None,
        reserve_s: float = RESERVE_FLOOR_S,
        clock: Callable[[], float] = time.time,
    ):
        self.schedule = schedule
        self.deadline = deadline
        self.fractions = fractions
        self.reserve_s = max(reserve_s, RESERVE_FLOOR_S)
        self.clock = clock
        self.phase = schedule.phase(start_step)
        self.phase_started = clock()
        self.untimed = {k: SKIP_STEPS for k in PHASES}
        self.timed = {k: 0 for k in PHASES}  # steps of each phase timed since timing_started
        self.timing_started: dict[int, float] = {}
        self.plans: list[dict] = []  # each re-plan: at which step, why, and the schedule it gave
        self.stopped = False

    def seconds_per_step(self, now: float) -> dict[int, float] | None:
        """Each phase's seconds per step: wall time over the steps timed (so its checkpoints and
        validations count in proportion) where it has been timed, else priced by ``PRIOR_COST``
        from the first phase that was; None before any was."""
        measured = {k: (now - self.timing_started[k]) / n for k, n in self.timed.items() if n}
        if not measured:
            return None
        base_phase = min(measured)
        unit = measured[base_phase] / PRIOR_COST[base_phase]
        return {k: measured.get(k, unit * PRIOR_COST[k]) for k in PHASES}

    def note_overhead(self, seconds: float) -> None:
        """A checkpoint or validation took ``seconds``: keep back at least that for the last one."""
        self.reserve_s = max(self.reserve_s, 1.5 * seconds)

    def after_step(self, done: int, seconds: float) -> Schedule:
        """Record that the step before ``done`` took ``seconds`` and return the schedule to follow.

        With fractions, re-plans when a phase has been timed over ``WARMUP_STEPS`` steps and again
        at 4x, 16x, ... as many (so periodic checkpoints enter its rate), and at each boundary."""
        now = self.clock()
        phase = self.schedule.phase(done - 1)
        if self.untimed[phase] > 0:
            self.untimed[phase] -= 1
            if self.untimed[phase] == 0:
                self.timing_started[phase] = now
        else:
            self.timed[phase] += 1
        costs = self.seconds_per_step(now)
        timed = self.timed[phase]
        if self.fractions is not None and costs is not None and done < self.schedule.t_train:
            if phase == self.phase and _is_replan_point(timed):
                self._replan(done, now, costs, f"phase {phase} timed over {timed} steps")
        while done < self.schedule.t_train and self.schedule.phase(done) != self.phase:
            # A boundary (reached, or moved here by a plan that left a phase no step): what is left
            # is shared out again among the phases still to run.
            self.phase, self.phase_started = self.schedule.phase(done), now
            if self.fractions is not None and costs is not None:
                self._replan(done, now, costs, f"phase {self.phase} begins")
        if done < self.schedule.t_train:
            next_cost = costs[self.schedule.phase(done)] if costs else seconds
            if now + next_cost + self.reserve_s > self.deadline:
                self.schedule = self.schedule.stopped_at(done)
                self.stopped = True
                self.plans.append({"step": done, "why": "deadline", **self.schedule.to_dict()})
        return self.schedule

    def _replan(self, done: int, now: float, costs: dict[int, float], why: str) -> None:
        remaining = self.deadline - now - self.reserve_s
        self.schedule = plan(self.schedule, done, remaining, self.fractions, costs, now - self.phase_started)
        self.plans.append(
            {
                "step": done,
                "why": why,
                "seconds_per_step": {str(k): round(v, 6) for k, v in costs.items()},
                **self.schedule.to_dict(),
            }
        )


def _is_replan_point(timed: int) -> bool:
    """``timed`` is ``WARMUP_STEPS`` x 4^i."""
    n, rest = divmod(timed, WARMUP_STEPS)
    return not rest and n > 0 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0
