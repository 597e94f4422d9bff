"""The schedule under a time budget (model/schedule.py), driven by a simulated clock: the step costs
of each phase are what a machine would measure, so a run's whole timeline plays out in microseconds."""

from __future__ import annotations

import pytest

from model.schedule import (
    PRIOR_COST,
    SKIP_STEPS,
    WARMUP_STEPS,
    BudgetPlanner,
    Schedule,
    parse_fractions,
    plan,
)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(
    budget, fractions, cost, *, start=Schedule(90_000, 10_000, 500_000), overhead=None, slow_after=None
):
    """Run ``BudgetPlanner`` as the training loop does: each step costs ``cost[phase]`` seconds
    (times 2 after step ``slow_after``), each phase end and every 50th step adds ``overhead``
    seconds of checkpoint. Returns the planner and the seconds spent in each phase."""
    clock = FakeClock()
    planner = BudgetPlanner(start, 0, clock.now + budget, fractions, clock=clock)
    spent = {1: 0.0, 2: 0.0, 3: 0.0}
    step, schedule = 0, start
    while step < schedule.t_train:
        phase = schedule.phase(step)
        seconds = cost[phase] * (2 if slow_after is not None and step >= slow_after else 1)
        clock.now += seconds
        spent[phase] += seconds
        step += 1
        schedule = planner.after_step(step, seconds)
        if overhead and (step in schedule.phase_ends or step % 50 == 0):
            clock.now += overhead
            spent[phase] += overhead
            planner.note_overhead(overhead)
    return planner, schedule, spent, clock.now - (planner.deadline - budget)


def test_fractions_are_three_shares_of_one_with_a_first_phase():
    assert parse_fractions("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    assert parse_fractions("1,0,0") == (1.0, 0.0, 0.0)
    for bad in ("0.8,0.1", "0.5,0.5,0.5", "0,0.5,0.5", "a,b,c", "0.9,0.2,-0.1", "nan,0,1"):
        with pytest.raises(ValueError, match="schedule fractions"):
            parse_fractions(bad)


def test_a_plan_buys_each_phase_its_share_of_the_time_at_its_own_rate():
    costs = {1: 0.1, 2: 0.05, 3: 0.2}
    assert plan(Schedule(5, 5, 20), 0, 100.0, (0.8, 0.1, 0.1), costs) == Schedule(800, 200, 1050)
    # In phase 2 after 10 s of it: phases 2 and 3 share 50 + 10 s half and half, phase 2 has 20 left.
    mid = plan(Schedule(800, 200, 1050), 900, 50.0, (0.8, 0.1, 0.1), costs, spent_in_phase_s=10.0)
    assert mid == Schedule(800, 100 + 400, 800 + 500 + 150)
    # In phase 3 everything left is phase 3's; earlier phases keep their lengths.
    assert plan(Schedule(800, 500, 1450), 1400, 20.0, (0.8, 0.1, 0.1), costs, 5.0) == Schedule(800, 500, 1500)
    # No time left: the current phase ends here.
    assert plan(Schedule(800, 200, 1050), 10, -3.0, (0.8, 0.1, 0.1), costs) == Schedule(10, 0, 10)


def test_a_budgeted_run_gives_each_phase_its_share_and_ends_before_the_deadline():
    # Costs unlike the priors (phase 2 dearer, phase 3 cheaper): the plan must correct itself.
    cost = {1: 0.10, 2: 0.09, 3: 0.12}
    assert cost[2] / cost[1] != PRIOR_COST[2]
    planner, schedule, spent, used = simulate(300.0, (0.8, 0.1, 0.1), cost, overhead=0.5)
    assert not planner.stopped or schedule.t_train - schedule.tc - schedule.td > 0
    assert schedule.tc > 0 and schedule.td > 0 and schedule.t_train > schedule.tc + schedule.td
    # The last checkpoint (0.5 s) fits in the reserve kept for it, and little else is wasted.
    assert 300.0 - 2.0 - 5.0 <= used <= 300.0
    # Each phase's share of the time within a few steps' worth of its fraction.
    for phase, fraction in zip((1, 2, 3), (0.8, 0.1, 0.1), strict=True):
        assert spent[phase] == pytest.approx(fraction * used, abs=3.0), (phase, spent)
    # Re-planned after phase 1's warm-up and at both boundaries (and after each later warm-up).
    whys = [p["why"] for p in planner.plans]
    assert whys[:3] == [f"phase 1 timed over {n * WARMUP_STEPS} steps" for n in (1, 4, 16)]
    assert planner.plans[0]["step"] == SKIP_STEPS + WARMUP_STEPS
    assert "phase 2 begins" in whys and "phase 3 begins" in whys
    assert planner.plans[-1]["t_train"] == schedule.t_train or planner.stopped


def test_a_run_that_slows_down_still_stops_at_the_deadline():
    cost = {1: 0.1, 2: 0.05, 3: 0.15}
    # Phase 3 starts near step 1080 and is timed by 1093; then every step takes twice as long.
    planner, schedule, spent, used = simulate(120.0, (0.7, 0.1, 0.2), cost, slow_after=1100)
    assert planner.stopped and planner.plans[-1]["why"] == "deadline"
    assert schedule.phase(schedule.t_train - 1) == 3
    assert used <= 120.0 - 2.0


def test_without_fractions_the_lengths_hold_and_the_deadline_cuts_the_run_short():
    cost = {1: 0.1, 2: 0.1, 3: 0.1}
    planner, schedule, _, used = simulate(50.0, None, cost, start=Schedule(100, 50, 1000))
    assert planner.stopped and (schedule.tc, schedule.td) == (100, 50)
    assert 150 < schedule.t_train < 500 and used <= 48.0
    # A schedule that fits is left alone.
    planner, schedule, _, _ = simulate(500.0, None, cost, start=Schedule(100, 50, 300))
    assert not planner.stopped and schedule == Schedule(100, 50, 300) and planner.plans == []


def test_a_cut_schedule_ends_every_unfinished_phase_and_validates_at_phase_ends():
    assert Schedule(100, 50, 1000).stopped_at(120) == Schedule(100, 20, 120)
    assert Schedule(100, 50, 1000).stopped_at(40) == Schedule(40, 0, 40)

    def validated(schedule, steps):
        done, inside = [], 0
        for step in steps:
            if schedule.validation_due(step, inside):
                done.append(step)
                inside += step < schedule.tc
        return done

    assert validated(Schedule(100, 20, 200), range(1, 201)) == [25, 50, 75, 100, 120, 200]
    # Phase 1 re-planned shorter after a point passed: the point is made up at once, not skipped.
    assert validated(Schedule(40, 20, 200), range(30, 201)) == [30, 31, 32, 40, 60, 200]
    with pytest.raises(ValueError):
        Schedule(10, 5, 12)
