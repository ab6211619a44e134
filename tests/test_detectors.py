"""Detectors and alert rules, on scripted numbers (no torch, no Lightning).

The scripted runs come from :func:`scripted_run`, a small numpy simulator of an
8-mode reference P (equal weights, well-separated modes) and a model Q given by
mixture weights w and a within-mode misfit d. For well-separated modes the KLs
decompose exactly:

    D(P‖Q) = Σ_g p_g [ln(p_g/w_g) + d_g^fwd],   D(Q‖P) = Σ_g w_g [ln(w_g/p_g) + d_g^rev]

and the per-group values are the bracketed terms. Each evaluation adds sampling
noise with the standard error an estimator on ``n_rows`` rows would report, plus
evaluation-to-evaluation jitter of the model itself (weights and misfit).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kl_monitor.detectors import ALERT_KINDS, Alert, AlertRules, CusumDetector, Evaluation

K = 8
EVERY = 100  # training steps between evaluations


# --------------------------------------------------------------------------------------
# The scripted-run simulator
# --------------------------------------------------------------------------------------


def scripted_run(
    seed: int,
    *,
    scenario: str = "healthy",
    n_evals: int = 60,
    onset: int = 35,
    n_rows: int = 4000,
    groups: bool = True,
    entropies: bool = False,
    drops: tuple[tuple[int, int], ...] = ((0, 4), (10, 2)),
    decay: float = 0.25,
) -> tuple[list[Evaluation], dict]:
    """Evaluations of a model converging on an 8-mode reference, then (maybe) failing.

    Args:
        seed: everything random comes from ``np.random.default_rng(seed)``.
        scenario: ``"healthy"`` (converges, nothing else), ``"collapse"`` (modes are
            dropped from ``onset`` on), ``"coverage_gap"`` (one group's forward KL
            rises, its mass stays), ``"over_dispersion"`` (every mode gets wider:
            reverse rises, forward barely) or ``"sharpening"`` (the model's entropy
            falls well below the reference's while reverse rises).
        n_evals: evaluations in the run.
        onset: index of the first evaluation of the failure.
        n_rows: held-out rows per evaluation (standard errors scale as 1/√n_rows).
        groups: include per-group forward, reverse and model mass (row counts).
        entropies: include H(Q) and H(P).
        drops: for ``"collapse"``, (evaluations after onset, modes left) stages:
            by default 8 → 4 at onset, then 4 → 2 ten evaluations later.
        decay: a dropped mode keeps this fraction of its weight per evaluation.

    Returns:
        The evaluations, and facts for assertions: ``"dropped"`` (stage → groups),
        ``"group"`` (the coverage-gap group), ``"onset"``.
    """
    rng = np.random.default_rng(seed)
    p = np.full(K, 1.0 / K)
    perm = [int(g) for g in rng.permutation(K)]
    gap_group = perm[0]
    dropped_at: dict[int, int] = {}  # group → evaluation index where its drop starts
    for delay, left in drops:
        for g in perm[left:]:
            dropped_at.setdefault(g, onset + delay)
    h_ref = math.log(K) + 1.0  # mixture of K unit-entropy modes

    evals = []
    for t in range(n_evals):
        since = t - onset  # < 0 before the failure
        conv = math.exp(-t / 6.0)  # training progress: 1 at start, → 0
        # Within-mode misfit (both directions ≈ equal near the optimum) with jitter.
        d_f = (0.02 + 1.2 * conv) * np.exp(0.1 * rng.standard_normal(K))
        d_r = d_f * np.exp(0.05 * rng.standard_normal(K))
        # Mixture weights: a little jitter that settles as training converges.
        w = p * np.exp((0.01 + 0.3 * conv) * rng.standard_normal(K))
        h_model = h_ref - 0.3 * conv + 0.01 * rng.standard_normal()
        if scenario == "collapse":
            for g, start in dropped_at.items():
                if t >= start:
                    w[g] = max(w[g] * decay ** (t - start + 1), 1e-7)
        elif scenario == "coverage_gap" and since >= 0:
            d_f[gap_group] += min(since + 1, 3) * 0.35  # a satellite the model misses
            d_r[gap_group] += min(since + 1, 3) * 0.02
            w[gap_group] *= 0.9  # some mass lost, far from vanishing
        elif scenario == "over_dispersion" and since >= 0:
            f = 1.0 + 0.15 * min(since + 1, 4)  # modes get wider: σ_q = f·σ_p in 2-D
            d_r += f * f - 1 - 2 * math.log(f)
            d_f += 1 / (f * f) - 1 + 2 * math.log(f)
            h_model += 2 * math.log(f)
        elif scenario == "sharpening" and since >= 0:
            s = min(since + 1, 4) / 4  # f goes from 1 down to 0.6
            f = 1.0 - 0.4 * s
            d_r += f * f - 1 - 2 * math.log(f)
            d_f += 1 / (f * f) - 1 + 2 * math.log(f)
            h_model += 2 * math.log(f)
        w = w / w.sum()

        fwd_g = np.log(p / w) + d_f
        rev_g = np.log(w / p) + d_r
        forward, reverse = float(p @ fwd_g), float(w @ rev_g)
        # Standard errors of row means: per-row variance ≈ 2·(within-mode KL) plus the
        # between-group spread of the per-group values.
        var_f = float(p @ (2 * d_f) + p @ (fwd_g - forward) ** 2)
        var_r = float(w @ (2 * d_r) + w @ (rev_g - reverse) ** 2)
        se_f, se_r = math.sqrt(var_f / n_rows), math.sqrt(var_r / n_rows)
        counts = rng.multinomial(n_rows, w)  # model rows per group
        ev = dict(
            step=(t + 1) * EVERY,
            forward=forward + se_f * rng.standard_normal(),
            forward_stderr=se_f,
            reverse=reverse + se_r * rng.standard_normal(),
            reverse_stderr=se_r,
        )
        if groups:
            n_p = n_rows * p
            ev["group_forward"] = {
                g: float(fwd_g[g] + math.sqrt(2 * d_f[g] / n_p[g]) * rng.standard_normal())
                for g in range(K)
            }
            ev["group_reverse"] = {
                g: float(rev_g[g] + math.sqrt(2 * d_r[g] / counts[g]) * rng.standard_normal())
                for g in range(K)
                if counts[g] > 0  # no model rows, no per-group reverse estimate
            }
            ev["group_count"] = {g: float(counts[g]) for g in range(K)}
        if entropies:
            ev["entropy_model"] = float(h_model)
            ev["entropy_reference"] = h_ref
        evals.append(Evaluation(**ev))
    stages = {}
    for delay, left in drops:
        stages[delay] = sorted(perm[left:])
    return evals, {"onset": onset, "dropped": stages, "group": gap_group, "perm": perm}


def run_rules(evals: list[Evaluation], rules: AlertRules | None = None) -> list[tuple[int, Alert]]:
    """Feed a run; return (evaluation index, alert) pairs."""
    rules = AlertRules() if rules is None else rules
    out = []
    for i, ev in enumerate(evals):
        out.extend((i, a) for a in rules.update(ev))
    return out


# --------------------------------------------------------------------------------------
# CusumDetector
# --------------------------------------------------------------------------------------


def siegmund_arl(k: float, h: float, shift: float) -> float:
    """Siegmund's approximation to the average run length of a one-sided CUSUM."""
    delta, b = shift - k, h + 1.166
    if abs(delta) < 1e-12:
        return b * b
    return (math.exp(-2 * delta * b) + 2 * delta * b - 1) / (2 * delta * delta)


def test_falling_series_does_not_accumulate():
    rng = np.random.default_rng(0)
    det = CusumDetector()
    t = np.arange(200)
    series = 0.02 + 3.0 * np.exp(-t / 15) + 0.003 * rng.standard_normal(t.size)
    for x in series:
        assert det.update(float(x), 0.003) is None
        assert det.statistic <= det.h / 2
    # The baseline followed the fall: it is near the converged level, not the start.
    assert det.baseline is not None and abs(det.baseline - 0.02) < 0.01


def test_rise_after_convergence_below_warmup_level_is_detected():
    det = CusumDetector()
    t = np.arange(120)
    series = 0.02 + 3.0 * np.exp(-t / 10)
    series[80:] += 0.3  # still far below the warm-up level (≈ 2.5)
    rng = np.random.default_rng(1)
    series += 0.005 * rng.standard_normal(t.size)
    fired = [i for i, x in enumerate(series) if det.update(float(x), 0.005) is not None]
    assert fired and 80 <= fired[0] <= 82
    assert fired == fired[:1]  # once


def test_one_sigma_shift_detected_in_about_ten_evaluations():
    # Textbook one-sided CUSUM (k = 0.5, h = 5, known in-control mean): average run
    # length ≈ 10.3 evaluations to detect a 1σ shift (Siegmund). The detector
    # estimates its baseline and noise, so it is allowed a little more.
    assert 9.5 < siegmund_arl(0.5, 5.0, 1.0) < 11
    delays = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        det = CusumDetector(min_effect=0.0)
        x = rng.standard_normal(300)
        x[100:] += 1.0
        for i, v in enumerate(x):
            if det.update(float(v), 1.0) is not None and i >= 100:
                delays.append(i - 100 + 1)  # evaluations from onset, onset included
                break
            if i >= 100 and not det.armed:  # a false alarm just before the shift
                break
    assert len(delays) > 150
    assert np.median(delays) <= 11
    assert np.mean(delays) <= 14


def test_in_control_false_alarms_match_the_run_length():
    # Siegmund: ARL₀ ≈ (e^{2kb} − 2kb − 1)/(2k²), b = h + 1.166, ≈ 938 evaluations for
    # k = 0.5, h = 5, so 2000 standard-normal evaluations give about 2.1 alarms. The
    # detector estimates its baseline (and, without a stderr, its noise), which may
    # cost some run length but not an order of magnitude: the mean over 10 runs stays
    # within 1.5× (stderr known) and 2.5× (noise learned alone) of 2.1, and no single
    # run exceeds 9 (P(Poisson(3.2) > 9) < 0.3%) when the stderr is known.
    b = 5.0 + 1.166
    arl0 = (math.exp(2 * 0.5 * b) - 2 * 0.5 * b - 1) / (2 * 0.5**2)
    assert 900 < arl0 < 1000
    expected = 2000 / arl0
    for stderr, factor in ((1.0, 1.5), (0.0, 2.5)):
        counts = []
        for seed in range(10):
            rng = np.random.default_rng(seed)
            det = CusumDetector(min_effect=0.0)
            xs = rng.standard_normal(2000)
            counts.append(sum(det.update(float(x), stderr) is not None for x in xs))
        assert np.mean(counts) <= factor * expected, (stderr, counts)
        if stderr:
            assert max(counts) <= 9, counts


def test_min_effect_suppresses_tiny_rises():
    # Near-zero standard error (an exact categorical estimate): a 1e-4 nats rise is
    # hundreds of standard errors, but far below min_effect.
    det = CusumDetector(min_effect=0.05)
    for i in range(20):
        assert det.update(0.02 + 1e-7 * (i % 2), 1e-7) is None
    for _ in range(20):
        assert det.update(0.0201, 1e-7) is None
    assert det.statistic == det.h  # significant in z terms, held back by min_effect
    assert det.update(0.09, 1e-7) is not None  # a real 0.07 nats rise fires


def test_once_per_episode_and_rearm():
    det = CusumDetector(warmup=5)
    rng = np.random.default_rng(3)

    def feed(level, n):
        return [det.update(level + 0.01 * float(rng.standard_normal()), 0.01) for _ in range(n)]

    assert not any(feed(0.1, 30))
    episode = feed(1.0, 20)
    assert sum(x is not None for x in episode) == 1 and episode[0] is not None
    assert not det.armed
    recovery = feed(0.1, 30)
    assert not any(recovery) and det.armed
    second = feed(1.0, 5)
    assert second[0] is not None and sum(x is not None for x in second) == 1


def test_infinite_and_nan_inputs():
    det = CusumDetector()
    for _ in range(10):
        det.update(0.1, 0.01)
    before = det.state_dict()
    assert det.update(float("nan"), 0.01) is None
    assert det.state_dict() == before  # NaN is ignored entirely
    assert det.update(0.1, float("inf")) is None  # a value with no information
    stat = det.update(float("inf"), float("inf") * 0)  # +inf value, NaN stderr
    assert stat is not None and math.isfinite(stat)
    state = det.state_dict()
    text = json.dumps(state, allow_nan=False)  # every stored number is finite
    assert "NaN" not in text and "Infinity" not in text
    # Infinite values during the warm-up are skipped, not learned from.
    fresh = CusumDetector(warmup=3)
    for x in (1.0, float("inf"), 0.9, 0.8):
        fresh.update(x, 0.01)
    assert fresh.baseline is not None and math.isfinite(fresh.baseline)


def test_state_dict_round_trip_mid_episode():
    rng = np.random.default_rng(4)
    series = [0.1 + 0.01 * float(rng.standard_normal()) for _ in range(30)] + [1.0] * 10
    series += [0.1] * 40 + [1.0] * 5
    ref = CusumDetector()
    fired_ref = [i for i, x in enumerate(series) if ref.update(x, 0.01) is not None]
    assert len(fired_ref) == 2
    for cut in (5, 31, 35, 60):  # warm-up, just fired, mid-episode, recovering
        a = CusumDetector()
        fired = [i for i, x in enumerate(series[:cut]) if a.update(x, 0.01) is not None]
        state = json.loads(json.dumps(a.state_dict(), allow_nan=False))
        b = CusumDetector(k=2.0, h=1.0)  # config comes from the state
        b.load_state_dict(state)
        fired += [cut + i for i, x in enumerate(series[cut:]) if b.update(x, 0.01) is not None]
        assert fired == fired_ref, cut


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": -0.1}, "`k` must be a finite number ≥ 0"),
        ({"h": 0.0}, "`h` must be a finite number > 0"),
        ({"h": float("inf")}, "`h` must be a finite number"),
        ({"warmup": 1}, "`warmup` must be an int ≥ 2, got 1"),
        ({"warmup": 5.0}, "`warmup` must be an int ≥ 2, got 5.0"),
        ({"warmup": True}, "`warmup` must be an int"),
        ({"min_effect": -1}, "`min_effect` must be a finite number ≥ 0"),
        ({"rearm": 5.0}, "`rearm` must be < h = 5"),
        ({"memory": 2}, "`memory` must be an int ≥ 5"),
        ({"k": "0.5"}, "`k` must be a real number, got '0.5'"),
    ],
)
def test_cusum_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CusumDetector(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kinds": ("collapse", "mode_collapse")}, "unknown: \\['mode_collapse'\\]"),
        ({"kinds": ()}, "non-empty subset"),
        ({"kinds": "collapse"}, "did you mean \\('collapse',\\)"),
        ({"entropy_drop": -0.5}, "`entropy_drop` must be a finite number ≥ 0"),
        ({"warmup": 0}, "`warmup` must be an int ≥ 2, got 0"),
        ({"h": -1}, "`h` must be a finite number > 0"),
    ],
)
def test_rules_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlertRules(**kwargs)


def test_update_rejects_non_evaluation():
    with pytest.raises(TypeError, match="must be an Evaluation"):
        AlertRules().update({"step": 1})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# AlertRules on scripted runs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_scripted_collapse_fires_within_five_evaluations_and_names_dropped_modes(seed):
    evals, info = scripted_run(seed, scenario="collapse")
    alerts = run_rules(evals)
    collapses = [(i, a) for i, a in alerts if a.kind == "collapse"]
    assert collapses, [a.message for _, a in alerts]
    i, alert = collapses[0]
    onset = info["onset"]
    assert onset <= i < onset + 5
    dropped = set(info["dropped"][0])
    assert alert.groups and set(alert.groups) <= dropped, (alert.groups, dropped)
    assert alert.step == evals[i].step
    assert "modes dropped" in alert.message and "ln(8/4)" in alert.message
    # Once per episode: the 4 → 2 stage is the same episode, no second collapse alert.
    assert len(collapses) == 1
    assert all(a.kind == "collapse" for _, a in alerts if _ >= onset)  # no mislabel


@pytest.mark.parametrize("seed", range(5))
def test_gradual_collapse_is_collapse_from_the_first_alert(seed):
    # Dropped modes keep 70% of their weight per evaluation: at onset the forward and
    # reverse rises are both under 0.1 nats; the mass leaving the rising groups is
    # what says "collapse" rather than "coverage gap".
    evals, info = scripted_run(seed, scenario="collapse", decay=0.7)
    alerts = run_rules(evals)
    i, first = alerts[0]
    assert first.kind == "collapse", first.message
    assert info["onset"] <= i < info["onset"] + 5
    assert first.groups and set(first.groups) <= set(info["dropped"][0])


@pytest.mark.parametrize("seed", range(10))
def test_healthy_run_raises_no_alert(seed):
    evals, _ = scripted_run(seed, scenario="healthy", entropies=True)
    assert run_rules(evals) == []


def test_collapse_without_groups_is_still_collapse():
    for seed in range(5):
        evals, info = scripted_run(seed, scenario="collapse", groups=False)
        alerts = run_rules(evals)
        assert alerts and alerts[0][1].kind == "collapse"
        assert info["onset"] <= alerts[0][0] < info["onset"] + 5
        assert alerts[0][1].groups == ()


def test_over_dispersion_scenario():
    for seed in range(5):
        evals, info = scripted_run(seed, scenario="over_dispersion", entropies=True)
        alerts = run_rules(evals)
        assert [a.kind for _, a in alerts] == ["over_dispersion"], [a.message for _, a in alerts]
        assert info["onset"] <= alerts[0][0] < info["onset"] + 5


def test_sharpening_scenario_is_collapse():
    for seed in range(5):
        evals, info = scripted_run(seed, scenario="sharpening", entropies=True, groups=False)
        alerts = run_rules(evals)
        assert alerts and alerts[0][1].kind == "collapse", [a.message for _, a in alerts]
        assert alerts[0][1].details["signature"] == "sharpening"
        assert "entropy" in alerts[0][1].message
        assert info["onset"] <= alerts[0][0] < info["onset"] + 5


def test_coverage_gap_scenario_names_the_group():
    for seed in range(5):
        evals, info = scripted_run(seed, scenario="coverage_gap")
        alerts = run_rules(evals)
        assert [a.kind for _, a in alerts] == ["coverage_gap"], [a.message for _, a in alerts]
        i, alert = alerts[0]
        assert alert.groups == (info["group"],)
        assert info["onset"] <= i < info["onset"] + 5


def test_support_violation_is_a_coverage_gap():
    evals, _ = scripted_run(0, scenario="healthy", groups=False)
    rules = AlertRules()
    for ev in evals[:40]:
        assert rules.update(ev) == []
    bad = Evaluation(evals[40].step, float("inf"), float("nan"), evals[40].reverse, 0.001)
    (alert,) = rules.update(bad)
    assert alert.kind == "coverage_gap" and "infinite" in alert.message
    assert math.isfinite(alert.statistic)
    json.dumps(rules.state_dict(), allow_nan=False)


def test_kinds_filter_reports_only_requested_kinds():
    evals, _ = scripted_run(0, scenario="over_dispersion", entropies=True)
    assert run_rules(evals, AlertRules(kinds=("collapse", "coverage_gap"))) == []


def test_rules_state_dict_round_trip_has_no_duplicates_or_losses():
    evals, info = scripted_run(2, scenario="collapse")
    ref = [(i, a.kind, a.groups) for i, a in run_rules(evals)]
    assert ref
    for cut in (3, info["onset"], info["onset"] + 1, info["onset"] + 3, info["onset"] + 12):
        rules = AlertRules()
        got = [(i, a.kind, a.groups) for i, a in run_rules(evals[:cut], rules)]
        state = rules.state_dict()
        text = json.dumps(state, allow_nan=False)  # plain, finite, JSON-serialisable
        restored = AlertRules(h=3.0)  # config comes from the state
        restored.load_state_dict(json.loads(text))
        assert restored.state_dict() == state
        got += [(cut + i, a.kind, a.groups) for i, a in run_rules(evals[cut:], restored)]
        assert got == ref, cut


def test_alert_to_dict_is_plain():
    evals, _ = scripted_run(1, scenario="collapse")
    (_, alert), *_ = run_rules(evals)
    d = alert.to_dict()
    assert d["kind"] in ALERT_KINDS and isinstance(d["groups"], list)
    json.dumps(d)


def test_alert_round_trips_through_to_dict():
    evals, _ = scripted_run(3, scenario="collapse")
    (_, alert), *_ = run_rules(evals)
    assert Alert(**alert.to_dict()) == alert
    again = Alert(**json.loads(json.dumps(alert.to_dict())))
    assert (again.kind, again.step, again.groups) == (alert.kind, alert.step, alert.groups)


def test_rules_rearm_after_recovery_and_fire_again():
    rng = np.random.default_rng(5)

    def ev(i, fwd, rev):
        noise = 0.003 * rng.standard_normal(2)
        return Evaluation(i * EVERY, fwd + noise[0], 0.003, rev + noise[1], 0.003)

    levels = [(0.02, 0.02)] * 30 + [(1.5, 0.69)] * 10 + [(0.02, 0.02)] * 40 + [(1.5, 0.69)] * 5
    rules = AlertRules()
    fired = [(i, a.kind) for i, (f, r) in enumerate(levels) for a in rules.update(ev(i, f, r))]
    assert fired == [(30, "collapse"), (80, "collapse")]


# --------------------------------------------------------------------- classification
def _reading(effect, z=10.0, significant=True, baseline=0.1, noise=0.01):
    from kl_monitor.diagnosis import Reading

    return Reading(z=z, effect=effect, raw=z, significant=significant, baseline=baseline,
                   noise=noise)  # fmt: skip


def test_classify_is_a_pure_function_of_the_evidence():
    from kl_monitor.diagnosis import Evidence, alert_message, classify

    quiet = _reading(0.0, z=0.0, significant=False)
    cases = {
        # forward rose, reverse flat: a coverage gap, named by its group
        "coverage_gap": Evidence(
            step=5, readings={("forward", None): _reading(0.4), ("reverse", None): quiet,
                              ("forward", 2): _reading(1.2), ("forward", 0): quiet},
            mass_base={0: 0.5, 2: 0.5}, share={0: 0.5, 2: 0.5}, forward=0.5, reverse=0.1),
        # the group whose forward KL rose lost its mass: a dropped mode
        "collapse": Evidence(
            step=5, readings={("forward", None): _reading(0.4), ("forward", 2): _reading(1.2)},
            mass_base={0: 0.5, 2: 0.5}, share={0: 0.9, 2: 0.1}, forward=0.5, reverse=0.1),
        # reverse rose more than forward
        "over_dispersion": Evidence(
            step=5, readings={("forward", None): quiet, ("reverse", None): _reading(0.6)},
            forward=0.1, reverse=0.7),
    }  # fmt: skip
    want = {"coverage_gap": ("forward_rise", (2,)), "collapse": ("mode_dropping", (2,)),
            "over_dispersion": ("reverse_rise", ())}  # fmt: skip
    for kind, ev in cases.items():
        d = classify(ev)
        assert (d.kind, d.signature, d.groups) == (kind, *want[kind]), kind
        assert classify(ev) == d  # no state: the same evidence, the same answer
        assert alert_message(d, ev).startswith(kind.replace("_", " ").replace("over ", "over-"))


def test_sharpening_needs_the_entropy_deficit():
    from kl_monitor.diagnosis import Evidence, classify

    readings = {("forward", None): _reading(0.1, z=1.0, significant=False),
                ("reverse", None): _reading(0.5)}  # fmt: skip
    sharp = Evidence(step=3, readings=readings, entropy_model=0.2, entropy_reference=1.5)
    assert (classify(sharp).kind, classify(sharp).signature) == ("collapse", "sharpening")
    flat = Evidence(step=3, readings=readings, entropy_model=1.4, entropy_reference=1.5)
    assert classify(flat).kind == "over_dispersion"


def test_alert_details_name_series_as_before():
    rules = AlertRules(warmup=3)
    for s in range(1, 9):
        rules.update(Evaluation(s, 1.0 / s, 0.01, 0.5 / s, 0.01, group_forward={0: 0.1, 1: 0.1},
                                group_count={0: 1.0, 1: 1.0}))  # fmt: skip
    (alert,) = rules.update(Evaluation(9, 2.5, 0.01, 0.7, 0.01, group_forward={0: 0.1, 1: 3.0},
                                       group_count={0: 1.0, 1: 1.0}))  # fmt: skip
    assert alert.details["lead_series"] == "forward"
    assert set(alert.details["series"]) >= {"forward", "group_forward:1"}
    state = rules.state_dict()
    assert "group_forward:1" in state["kind_series"][alert.kind]  # version-1 checkpoint form
    twin = AlertRules()
    twin.load_state_dict(state)
    assert twin.state_dict() == state
