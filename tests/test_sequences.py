"""Sequence-level KL along sampled prefixes: exact Markov-chain fixtures and generation.

The ground truth is exact: when P and Q are Markov chains over a small vocabulary, the
sequence-level KL over T steps follows by dynamic programming over the state
distribution of the sampling chain (written here with numpy, independent of the package,
and itself checked against brute-force enumeration).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from kl_monitor.sequences import SamplingTransform, sequence_kl, valid_direction

V = 4  # vocabulary of the Markov fixtures
REPEATS = 400  # independent estimates per case (coverage sd ≈ 0.011)
N_SEQ = 32  # sequences per estimate


# ------------------------------------------------------------------ exact fixture
def markov_pair(seed: int, vocab: int = V, concentration: float = 2.0):
    """Two Markov chains (initial distribution, transition matrix) drawn at random."""
    rng = np.random.default_rng(seed)

    def chain():
        return rng.dirichlet(np.full(vocab, concentration)), rng.dirichlet(
            np.full(vocab, concentration), size=vocab
        )

    return chain(), chain()


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * (np.log(a) - np.log(b)), axis=-1)


def exact_sequence_kl(a, b, steps: int) -> float:
    """D(A_T‖B_T) = KL(a₁‖b₁) + Σ_{t≥2} E_{s∼A_{t−1}}[KL(A(·|s)‖B(·|s))], by DP."""
    (init_a, trans_a), (init_b, trans_b) = a, b
    total, state = float(_kl(init_a, init_b)), init_a
    per_state = _kl(trans_a, trans_b)
    for _ in range(steps - 1):
        total += float(state @ per_state)
        state = state @ trans_a
    return total


def brute_force_kl(a, b, steps: int) -> float:
    """Σ over every sequence of A(y) log(A(y)/B(y)): the definition, for tiny cases."""
    (init_a, trans_a), (init_b, trans_b) = a, b
    total = 0.0
    for y in itertools.product(range(len(init_a)), repeat=steps):
        pairs = list(zip(y[:-1], y[1:], strict=True))
        la = math.log(init_a[y[0]]) + sum(math.log(trans_a[s, t]) for s, t in pairs)
        lb = math.log(init_b[y[0]]) + sum(math.log(trans_b[s, t]) for s, t in pairs)
        total += math.exp(la) * (la - lb)
    return total


def sample_logits(a, b, n: int, steps: int, seed: int):
    """n sequences of the chain a; per-position logits of a and b, and the tokens."""
    g = torch.Generator().manual_seed(seed)
    (init_a, trans_a), (init_b, trans_b) = a, b
    ta, tb = torch.tensor(trans_a), torch.tensor(trans_b)
    # inverse CDF with one draw of uniforms (multinomial row by row is slow)
    u = torch.rand(n, steps, 1, generator=g, dtype=torch.float64)
    cdf0, cdf = torch.tensor(init_a).cumsum(0), ta.cumsum(-1)
    x = torch.empty(n, steps, dtype=torch.long)
    x[:, 0] = (cdf0 < u[:, 0]).sum(-1).clamp(max=len(init_a) - 1)
    for t in range(1, steps):
        x[:, t] = (cdf[x[:, t - 1]] < u[:, t]).sum(-1).clamp(max=len(init_a) - 1)
    prev = x[:, :-1]
    log_a = torch.cat((torch.tensor(init_a).log().expand(n, 1, -1), ta.log()[prev]), 1)
    log_b = torch.cat((torch.tensor(init_b).log().expand(n, 1, -1), tb.log()[prev]), 1)
    return log_a.float(), log_b.float(), x


def sampled_log_ratio(log_a: torch.Tensor, log_b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """k1 per sequence: Σ_t log a(x_t | x_<t) − log b(x_t | x_<t) at the sampled tokens."""
    idx = x.unsqueeze(-1)
    return (log_a.double().gather(-1, idx) - log_b.double().gather(-1, idx)).sum((1, 2))


def test_dp_matches_brute_force_enumeration():
    a, b = markov_pair(3, vocab=3)
    for steps in (1, 2, 4):
        assert exact_sequence_kl(a, b, steps) == pytest.approx(brute_force_kl(a, b, steps), 1e-12)
        assert exact_sequence_kl(b, a, steps) == pytest.approx(brute_force_kl(b, a, steps), 1e-12)


@pytest.mark.parametrize("steps", [8, 64])
@pytest.mark.parametrize("sampled_from", ["model", "reference"])
def test_unbiased_and_stderr_covers_on_markov_chains(steps, sampled_from):
    # P = reference, Q = model. Rows from Q estimate D(Q‖P); rows from P estimate D(P‖Q).
    ref, model = markov_pair(11 + steps)
    src, other = (model, ref) if sampled_from == "model" else (ref, model)
    truth = exact_sequence_kl(src, other, steps)
    log_src, log_other, x = sample_logits(src, other, REPEATS * N_SEQ, steps, seed=steps)
    log_p, log_q = (log_other, log_src) if sampled_from == "model" else (log_src, log_other)
    k1 = sampled_log_ratio(log_src, log_other, x)
    # one call over every repeat; each repeat's estimate is the package's own reduction
    # of its N_SEQ sums (checked on a few repeats below)
    est_all = sequence_kl(log_p, log_q, sampled_from=sampled_from)
    assert est_all.direction == valid_direction(sampled_from)
    sums = est_all.per_sequence.reshape(REPEATS, N_SEQ).numpy()
    values = sums.mean(1)
    errors = sums.std(1, ddof=1) / math.sqrt(N_SEQ)
    for r in (0, REPEATS - 1):
        rows = slice(r * N_SEQ, (r + 1) * N_SEQ)
        est = sequence_kl(log_p[rows], log_q[rows], sampled_from=sampled_from)
        assert (est.value, est.stderr) == pytest.approx((values[r], errors[r]), rel=1e-9)
    sd = values.std(ddof=1)
    # unbiased: the mean of 400 estimates is within 4 of its standard errors of the truth
    assert abs(values.mean() - truth) < 4 * sd / math.sqrt(REPEATS)
    # nominal 95% intervals cover at 0.95 ± 3 binomial sd
    coverage = np.mean(np.abs(values - truth) <= 1.96 * errors)
    assert abs(coverage - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / REPEATS), coverage
    # the stderr is the sd of the estimates (ratio within 3 sd of its sampling noise)
    assert abs(errors.mean() / sd - 1) < 3 / math.sqrt(2 * (REPEATS - 1))
    # Rao–Blackwellized per-sequence sums vary less than k1 on this fixture
    assert est_all.per_sequence.std() < k1.std()
    assert float(k1.mean()) == pytest.approx(truth, abs=4 * float(k1.std()) / math.sqrt(k1.numel()))


def test_teacher_forced_direction_is_not_the_sequence_kl():
    # On model samples the forward sum is a diagnostic: it misses D(P‖Q) by far more than
    # its noise, which is why the monitor never logs it under the name "forward".
    ref, model = markov_pair(5)
    log_q, log_p, _ = sample_logits(model, ref, 4000, 8, seed=1)
    est = sequence_kl(log_p, log_q, sampled_from="model")
    fwd_truth = exact_sequence_kl(ref, model, 8)
    diag = est.teacher_forced
    assert est.other_direction == "forward_on_model_samples"
    assert abs(float(diag.mean()) - fwd_truth) > 10 * float(diag.std()) / math.sqrt(4000)


def test_rao_blackwell_is_not_always_below_k1_exact_counterexample():
    # Q is P restricted to a subset: log Q(y)/P(y) is constant on Q's support, so
    # Σ k1 has variance 0, while the per-prefix KLs still vary with the prefix. Exact,
    # by enumerating Q's support (2 sequences).
    def t(rows):
        return torch.tensor(rows, dtype=torch.float64)

    p1 = math.exp(2) / (1 + math.exp(2))
    ref_init = t([p1, 1 - p1, 0.0]).log()
    ref_next = t([[math.exp(-2), 1 - math.exp(-2), 0.0], [0.2, 0.3, 0.5], [1 / 3] * 3]).log()
    mod_init = t([0.5, 0.5, 0.0]).log()
    mod_next = t([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [1 / 3] * 3]).log()
    seqs = torch.tensor([[0, 0], [1, 0], [1, 1], [1, 2]])
    weights = torch.tensor([0.5, 0.5 * 0.2, 0.5 * 0.3, 0.5 * 0.5], dtype=torch.float64)
    log_p = torch.stack((ref_init.expand(4, 3), ref_next[seqs[:, 0]]), 1)
    log_q = torch.stack((mod_init.expand(4, 3), mod_next[seqs[:, 0]]), 1)
    est = sequence_kl(log_p, log_q, sampled_from="model")
    k1 = sampled_log_ratio(log_q, log_p, seqs)
    mean_rb, mean_k1 = (weights * est.per_sequence).sum(), (weights * k1).sum()
    var_rb = (weights * (est.per_sequence - mean_rb) ** 2).sum()
    var_k1 = (weights * (k1 - mean_k1) ** 2).sum()
    assert float(mean_rb) == pytest.approx(float(mean_k1), abs=1e-12)  # both unbiased
    assert float(var_k1) < 1e-20 and float(var_rb) == pytest.approx(1.0, abs=1e-9)


# ------------------------------------------------------------------ estimator contract
def test_mask_lengths_and_token_mean():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 6, 7, generator=g), torch.randn(5, 6, 7, generator=g)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[0, 3:] = False
    mask[4] = False  # a sequence with no counted position is left out
    est = sequence_kl(p, q, mask, sampled_from="reference")
    rows = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=p.double()),
        torch.distributions.Categorical(logits=q.double()),
    )
    sums = (rows * mask).sum(-1)
    assert est.n_sequences == 4 and est.n_tokens == 3 + 3 * 6
    torch.testing.assert_close(est.per_sequence, sums, rtol=1e-5, atol=1e-6)
    assert est.value == pytest.approx(float(sums[:4].mean()), rel=1e-5)
    assert est.stderr == pytest.approx(float(sums[:4].std() / 2), rel=1e-5)
    assert est.token_mean == pytest.approx(float(sums.sum() / mask.sum()), rel=1e-5)
    assert est.direction == "forward" and est.other_direction == "reverse_on_reference_samples"


def test_token_mean_stderr_is_delta_method_over_sequences():
    # sequences of different lengths: the ratio estimator's stderr, by a direct formula
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(40, 9, 5, generator=g), torch.randn(40, 9, 5, generator=g)
    lengths = torch.randint(1, 10, (40,), generator=g)
    mask = torch.arange(9) < lengths[:, None]
    est = sequence_kl(p, q, mask, sampled_from="model")
    s, n_tok = est.per_sequence.numpy(), lengths.double().numpy()
    ratio = s.sum() / n_tok.sum()
    resid = s - ratio * n_tok
    se = math.sqrt(np.sum(resid**2) / (40 * 39)) / n_tok.mean()
    assert est.token_mean == pytest.approx(ratio, rel=1e-9)
    assert est.token_mean_stderr == pytest.approx(se, rel=1e-9)


def test_errors_name_what_is_wrong():
    p = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="sampled_from"):
        sequence_kl(p, p, sampled_from="policy")
    with pytest.raises(ValueError, match=r"\(batch, seq, K\)"):
        sequence_kl(p[0], p[0])
    with pytest.raises(TypeError, match="bool"):
        sequence_kl(p, p, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        sequence_kl(p, p, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no counted position"):
        sequence_kl(p, p, torch.zeros(2, 3, dtype=torch.bool))
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5), dict(top_p=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingTransform(**bad)


def test_support_violation_is_inf_not_nan():
    p = torch.zeros(3, 2, 4)
    q = torch.zeros(3, 2, 4)
    p[0, 1, 2] = -math.inf  # reference forbids a token the model can emit
    est = sequence_kl(p, q, sampled_from="model")
    assert est.value == math.inf and est.per_sequence[0] == math.inf
    assert torch.isfinite(est.per_sequence[1:]).all()
