"""Sampling continuations with the monitor's own RNG, and the transformers helper."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import logging as hf_logging

from kl_monitor.generation import (
    hf_generation_inputs,
    recompute_step,
    sample_continuations,
)
from kl_monitor.sequences import SamplingTransform, sequence_kl

hf_logging.set_verbosity_error()
VOCAB = 24


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    """A randomly initialised 1-layer GPT-2 (no download), in eval mode."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=96,
                     bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def prompts(n: int = 6, length: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded prompt
    return ids, mask


# ------------------------------------------------------------------ transforms
@pytest.mark.parametrize(
    "kw", [dict(temperature=0.7), dict(top_k=3), dict(top_p=0.8),
           dict(temperature=1.5, top_k=5, top_p=0.9)]
)
def test_sampling_transform_matches_transformers_warpers(kw):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, VOCAB, generator=g) * 2
    ref = logits.clone()
    if "temperature" in kw:
        ref = TemperatureLogitsWarper(kw["temperature"])(None, ref)
    if "top_k" in kw:
        ref = TopKLogitsWarper(kw["top_k"])(None, ref)
    if "top_p" in kw:
        ref = TopPLogitsWarper(kw["top_p"])(None, ref)
    ours = SamplingTransform(**kw)(logits)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


# ------------------------------------------------------------------ sampling
def test_draws_follow_the_transformed_distribution_and_never_a_removed_token():
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0, -3.0])
    transform = SamplingTransform(temperature=0.8, top_k=4)
    step = recompute_step(lambda ids: logits.expand(*ids.shape, 5))
    gen = sample_continuations(step, torch.zeros(20_000, 1, dtype=torch.long), 1,
                               generator=torch.Generator().manual_seed(0), transform=transform)
    probs = torch.softmax(transform(logits).double(), -1)
    counts = torch.bincount(gen.continuation[:, 0], minlength=5).double()
    sd = (20_000 * probs * (1 - probs)).sqrt()
    assert counts[4] == 0  # probability 0 after top-k
    assert ((counts - 20_000 * probs).abs() <= 4 * sd + 1e-9).all(), (counts, probs)
    torch.testing.assert_close(gen.logits[:, 0], transform(logits).expand(20_000, 5))


def test_end_token_masks_the_rest_and_pads():
    # first step: end (1) or token 2, equally likely; from then on only the end token
    def model_fn(ids):
        out = torch.full((*ids.shape, 3), -math.inf)
        out[..., 1] = 0.0
        out[:, 0, 2] = 0.0  # position 0 is the 1-token prompt
        return out

    gen = sample_continuations(recompute_step(model_fn), torch.zeros(64, 1, dtype=torch.long),
                               5, generator=torch.Generator().manual_seed(0),
                               eos_token_id=1, pad_token_id=2)
    cont = gen.continuation
    first_end = (cont == 1).int().argmax(1)
    assert set(first_end.tolist()) == {0, 1}  # both paths were sampled
    positions = torch.arange(5)
    assert torch.equal(gen.mask, positions <= first_end[:, None])
    assert (cont[positions > first_end[:, None]] == 2).all()  # padding after the end
    assert gen.logits.shape == (64, 5, 3)  # stopped early, padded to max_new_tokens


def test_sampling_never_touches_the_global_rng_and_is_reproducible():
    model, ref = tiny_gpt2(0), tiny_gpt2(1)
    ids, mask = prompts()
    state = torch.get_rng_state()
    a = hf_generation_inputs(model, ref, ids, mask, max_new_tokens=6,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = hf_generation_inputs(model, ref, ids, mask, max_new_tokens=6,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.model, b.model) and torch.equal(a.reference, b.reference)
    assert a.sampled_from == "model" and a.mask.shape == (6, 6)
    c = hf_generation_inputs(model, ref, ids, mask, max_new_tokens=6, max_batch=4,
                             generator=torch.Generator().manual_seed(5))
    assert c.model.shape == a.model.shape and c.mask.shape == a.mask.shape


def test_generation_logits_are_the_model_and_reference_at_the_generated_positions():
    # top_k=1 is greedy: each generated token is the model's argmax, and with the model
    # as its own reference KL(δ_argmax ‖ P) = −log P(argmax) at every position.
    model = tiny_gpt2(0)
    model.train()  # the helper evaluates in eval mode and restores the flag
    ids, mask = prompts()
    inputs = hf_generation_inputs(model, model, ids, mask, max_new_tokens=7,
                                  generator=torch.Generator().manual_seed(0),
                                  transform=SamplingTransform(top_k=1))
    assert model.training
    model.eval()
    tokens = torch.cat((ids, inputs.model.argmax(-1)), 1)
    full = torch.cat((mask, torch.ones(6, 7, dtype=torch.long)), 1)
    pos = (full.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=tokens, attention_mask=full, position_ids=pos).logits
    step_logits = logits[:, ids.shape[1] - 1:-1]
    assert torch.equal(inputs.model.argmax(-1), step_logits.argmax(-1))
    torch.testing.assert_close(inputs.reference, step_logits, atol=1e-5, rtol=1e-5)
    est = sequence_kl(inputs.reference, inputs.model, inputs.mask, sampled_from="model")
    expected = -step_logits.log_softmax(-1).amax(-1).double().sum(-1)
    torch.testing.assert_close(est.per_sequence, expected, atol=1e-4, rtol=1e-5)


def test_helper_errors_name_what_is_wrong():
    model = tiny_gpt2(0)
    ids, mask = prompts()
    right_padded = mask.flip(1)
    gen = torch.Generator()
    with pytest.raises(ValueError, match="left-padded"):
        hf_generation_inputs(model, model, ids, right_padded, max_new_tokens=2, generator=gen)
    with pytest.raises(ValueError, match="max_new_tokens"):
        hf_generation_inputs(model, model, ids, mask, max_new_tokens=0, generator=gen)
    with pytest.raises(TypeError, match="torch.Generator"):
        hf_generation_inputs(model, model, ids, mask, max_new_tokens=2, generator=0)
    with pytest.raises(TypeError, match="prompt_ids"):
        hf_generation_inputs(model, model, ids.float(), mask, max_new_tokens=2, generator=gen)
    with pytest.raises(ValueError, match="max_batch"):
        hf_generation_inputs(model, model, ids, mask, max_new_tokens=2, generator=gen,
                             max_batch=0)
