"""The paired-evidence alert engine (kl_monitor.alerting) on scripted evidence.

References: numpy for the paired standard error, scipy for the Bonferroni bar,
closed-form effects for the rules; the scenario benchmark's fast subset for the
whole chain (rows -> paired evidence -> alerts) against its ground truth.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kl_monitor.alerting import (
    AlertEngine,
    AlertThresholds,
    Change,
    Evidence,
    assess,
    classify,
    z_critical,
)

ROOT = Path(__file__).resolve().parents[1]


def flat(level: float = 0.1, se: float = 1e-3) -> Change:
    return Change(level, level, se)


def test_change_from_sums_matches_the_paired_standard_error():
    rng = np.random.default_rng(0)
    base = rng.normal(0.3, 1.0, 500)
    now = base + rng.normal(0.05, 0.1, 500)  # paired: the same rows, a small change
    d = now - base
    c = Change.from_sums(500, now.sum(), base.sum(), float((d * d).sum()))
    assert c.rise == pytest.approx(d.mean())
    assert c.se == pytest.approx(d.std(ddof=1) / math.sqrt(500), rel=1e-9)
    # Far smaller than the independent-samples standard error of the difference.
    unpaired = math.hypot(now.std(ddof=1), base.std(ddof=1)) / math.sqrt(500)
    assert c.se < unpaired / 5


def test_z_critical_is_the_one_sided_bonferroni_quantile():
    for s, alpha in ((1, 0.05), (26, 1e-4), (152, 1e-4)):
        assert z_critical(s, alpha) == pytest.approx(stats.norm.isf(alpha / s), rel=1e-9)


def test_change_z_signs_and_support_violation():
    assert Change(0.2, 0.1, 0.01).z == pytest.approx(10.0)
    assert Change(0.1, 0.2, 0.0).z == -math.inf
    assert Change(math.inf, 0.1, 0.0).rise == math.inf
    assert Change(math.inf, math.inf, 0.0).rise == 0.0


def test_a_fall_is_never_an_alert_and_moves_the_baseline():
    eng = AlertEngine()
    d = eng.update(Evidence(0, forward=Change(0.1, 5.0, 0.01), reverse=Change(0.1, 3.0, 0.01)))
    assert d.alerts == [] and d.rebase


def test_global_rise_needs_both_the_effect_and_the_significance():
    th = AlertThresholds()
    z_star = z_critical(2, th.false_alarm_rate)
    # Significant but below max(0.05 nats, 50% of 0.1): no alert.
    small = Evidence(1, forward=Change(0.14, 0.1, 1e-6), reverse=flat())
    assert not assess(small).moved
    # Large but not significant: no alert.
    noisy = Evidence(1, forward=Change(0.3, 0.1, 0.2 / (z_star - 0.1)), reverse=flat())
    assert not assess(noisy).moved
    # Large and significant.
    big = Evidence(1, forward=Change(0.3, 0.1, 0.2 / (z_star + 0.1)), reverse=flat())
    assert assess(big).forward


def sampled(step, forward, mass, reverse=None, p=None):
    g = len(forward)
    p = p or {k: 1.0 / g for k in range(g)}
    # Reverse contributions consistent with the masses: q_g·ln(q_g/p_g), the shapes kept.
    reverse = reverse or {
        k: Change(m.current * math.log(m.current / p[k]), m.baseline * math.log(m.baseline / p[k]),
                  1e-3)
        for k, m in mass.items()
    }  # fmt: skip
    return Evidence(
        step,
        forward=Change(
            sum(c.current for c in forward.values()),
            sum(c.baseline for c in forward.values()),
            1e-3,
        ),
        reverse=flat(0.05),
        group_forward=forward,
        group_reverse=reverse,
        group_mass=mass,
        group_reference_mass=p,
    )


def test_mode_dropping_names_the_modes_that_lost_half_their_mass():
    # 4 modes; modes 1 and 3 keep 30% and 40% of their mass: their forward
    # contribution rises by p·ln(1/ratio) (the mass part), the others gain mass.
    w = {0: 0.35 / 0.25 * 0.25, 1: 0.3 * 0.25, 2: 0.35 / 0.25 * 0.25, 3: 0.4 * 0.25}
    total = sum(w.values())
    w = {k: v / total for k, v in w.items()}
    fwd = {k: Change(0.25 * math.log(0.25 / w[k]), 0.0, 1e-3) for k in w}
    mass = {k: Change(w[k], 0.25, 5e-3) for k in w}
    ev = sampled(10, fwd, mass)
    kind, signature, groups = classify(assess(ev), ev)
    assert (kind, signature, groups) == ("collapse", "mode_dropping", (1, 3))
    a = AlertEngine().update(ev).alerts[0]
    ratio1 = w[1] / 0.25
    assert f"1 lost {1 - ratio1:.0%}" in a.message
    assert "rose +" in a.message


def test_a_mass_wobble_is_not_a_coverage_gap():
    # Mode 0 at 0.86x the reference (the healthy wobble): its conditional
    # forward KL moves by ln(1/0.86) = 0.15 nats, all of it mass.
    p = 1 / 6
    w0 = 0.86 * p
    rest = (1 - w0) / 5
    fwd = {0: Change(p * math.log(p / w0), 0.0, 1e-4)}
    fwd.update({k: Change(p * math.log(p / rest), 0.0, 1e-4) for k in range(1, 6)})
    mass = {0: Change(w0, p, 2e-3)}
    mass.update({k: Change(rest, p, 2e-3) for k in range(1, 6)})
    ev = sampled(3, fwd, mass)
    assert not assess(ev).moved
    assert AlertEngine().update(ev).alerts == []


def logits(step, h_now, rev_now, g=4, target=2):
    """Group `target`'s entropy and reverse contribution moved; the rest flat."""
    ent = {k: Change(h_now if k == target else 1.8, 1.8, 1e-3) for k in range(g)}
    rev = {k: Change(rev_now if k == target else 0.01, 0.01, 1e-4) for k in range(g)}
    fwd = {k: Change(rev_now * 1.1 if k == target else 0.01, 0.01, 1e-4) for k in range(g)}
    return Evidence(
        step,
        forward=Change(sum(c.current for c in fwd.values()), 0.04, 1e-4),
        reverse=Change(sum(c.current for c in rev.values()), 0.04, 1e-4),
        group_forward=fwd,
        group_reverse=rev,
        group_reference_mass={k: 1 / g for k in range(g)},
        group_entropy=ent,
        group_entropy_reference={k: 1.8 for k in range(g)},
    )


def test_sharpening_of_one_prompt_type_is_a_collapse_naming_it():
    ev = logits(7, h_now=1.2, rev_now=0.06)
    assert classify(assess(ev), ev) == ("collapse", "sharpening", (2,))
    msg = AlertEngine().update(ev).alerts[0].message
    assert "group 2's model entropy fell 0.6 nats to 1.2 (reference 1.8)" in msg


def test_entropy_alone_never_raises_an_alert():
    ev = logits(7, h_now=1.0, rev_now=0.01)  # entropy fell, KL flat
    assert not assess(ev).moved


def test_flattening_is_over_dispersion_and_escalation_updates_the_episode():
    eng = AlertEngine()
    first = eng.update(logits(5, h_now=2.3, rev_now=0.06)).alerts
    assert [(a.kind, a.groups, a.details["update"]) for a in first] == [
        ("over_dispersion", (2,), False)
    ]
    # Same episode: it turns into a lock-in on one token (entropy far below).
    later = eng.update(logits(6, h_now=0.4, rev_now=0.5)).alerts
    assert [(a.kind, a.details["update"], a.details["episode"]) for a in later] == [
        ("collapse", True, 1)
    ]
    assert later[0].message.startswith("update of alert 1: collapse (sharpening)")
    # No third alert while it lasts; the episode closes after `rearm` calm evaluations.
    assert eng.update(logits(7, h_now=0.4, rev_now=0.5)).alerts == []
    for s in range(8, 8 + AlertThresholds().rearm):
        eng.update(logits(s, h_now=1.8, rev_now=0.01))
    assert not eng.open
    assert eng.update(logits(20, h_now=1.2, rev_now=0.06)).alerts[0].details["episode"] == 2


def test_support_violation_is_a_coverage_gap_in_its_group():
    fwd = {0: flat(0.02), 1: Change(math.inf, 0.02, 0.0)}
    ev = Evidence(4, forward=Change(math.inf, 0.04, 0.0), reverse=flat(0.03), group_forward=fwd)
    a = AlertEngine().update(ev).alerts[0]
    assert (a.kind, a.details["signature"], a.groups) == ("coverage_gap", "support", (1,))
    assert "infinite in group 1" in a.message


def test_rebase_per_group_and_never_during_an_episode():
    eng = AlertEngine()
    fwd = {0: Change(0.01, 0.02, 1e-3), 1: Change(0.03, 0.02, 1e-3)}
    d = eng.update(Evidence(1, forward=Change(0.04, 0.05, 1e-3), group_forward=fwd))
    assert d.rebase and d.rebase_groups == (0,)  # group 1 rose a little: kept
    up = Evidence(2, forward=Change(0.5, 0.05, 1e-3))
    assert eng.update(up).alerts
    d = eng.update(Evidence(3, forward=Change(0.01, 0.05, 1e-3), group_forward=fwd))
    assert not d.rebase and d.rebase_groups == ()


def test_state_dict_round_trip_continues_the_episode():
    eng = AlertEngine(AlertThresholds(rearm=2))
    eng.update(Evidence(1, forward=Change(0.5, 0.05, 1e-3)))
    clone = AlertEngine()
    clone.load_state_dict(eng.state_dict())
    assert clone.thresholds.rearm == 2 and clone.open and clone.episode == 1
    assert clone.update(Evidence(2, forward=Change(0.5, 0.05, 1e-3))).alerts == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mass_loss": 1.0}, "mass_loss"),
        ({"global_nats": -1.0}, "global_nats"),
        ({"false_alarm_rate": 0.0}, "false_alarm_rate"),
        ({"rearm": 0}, "rearm"),
        ({"relative": math.nan}, "relative"),
    ],
)
def test_thresholds_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlertThresholds(**kwargs)


def test_engine_rejects_other_inputs():
    with pytest.raises(TypeError, match="Evidence"):
        AlertEngine().update({"forward": 0.1})


@pytest.fixture(scope="module")
def scenarios():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import alert_scenarios

    return alert_scenarios


@pytest.mark.parametrize(
    "family",
    ["bad_init", "converged_exact", "abrupt_drop", "sharpen_one_prompt", "support_violation"],
)
def test_scenario_benchmark_fast_subset(scenarios, family):
    """Rows -> paired evidence -> alerts on one seed, scored against the truth."""
    fam = {f.name: f for f in scenarios.families()}[family]
    r = scenarios.simulate(fam, seed=0, detectors=("new",))
    s = scenarios.score([r], "new")
    assert s.false_alarms == 0, r.alerts
    if r.fault:
        assert s.detected == 1 and s.kind_ok == 1 and s.groups_ok == 1, (r.onset, r.alerts)
        assert 0 <= s.delays[0] <= 2
    else:
        assert r.margin < 1.0  # the healthy run holds no true event
