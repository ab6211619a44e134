"""Sampling continuations for sequence-level KL, with the monitor's own RNG.

The pattern, for any autoregressive model:

1. take prompts from the held-out loader;
2. sample continuations from the model with a dedicated ``torch.Generator`` (never the
   global RNG, so training is bitwise unchanged), a bounded length and batch, in eval
   mode without gradients, keeping the (transformed) logits each token was drawn from;
3. run the reference once on the generated sequences and keep its logits at the same
   positions;
4. hand both to ``KLInputs.from_logits(..., mask=generated, sampled_from="model")``.

``sample_continuations`` does 2 for any step function; ``hf_generation_inputs`` does
2–4 for a Hugging Face ``transformers`` causal LM (with its KV cache).

**``hf_generation_inputs``.** It samples continuations of the (left-padded) prompts
from ``model`` with ``generator`` and its KV cache, ``max_batch`` prompts at a time,
keeping the transformed logits each token was drawn from; runs ``reference`` once on
each generated batch; returns the two sets of logits ``(B, T, K)`` at the generated
positions, masked to the generated part (up to and including ``eos_token_id``). Both
models run in eval mode without gradients, and their training flags are restored. The
global RNG is never touched.

With ``transform`` (temperature, top-k, top-p) the KL is that of the model's *sampling*
distribution; ``reference_transform`` (default: none) is applied to the reference's
logits, e.g. ``SamplingTransform(temperature=T)`` to compare at the same temperature
as TRL and verl do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .inputs import KLInputs
from .sequences import SamplingTransform

__all__ = ["Generation", "StepFn", "recompute_step", "sample_continuations",
           "hf_generation_inputs"]

#: ``step(new_ids, state) -> (next_logits, state)``: logits ``(B, K)`` of the next token
#: after ``new_ids`` ``(B, n)`` are appended; ``state`` is ``None`` on the first call
#: (``new_ids`` is then the whole prompt) and whatever the previous call returned after.
StepFn = Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]

_MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class Generation:
    """Sampled continuations and the distributions they were drawn from.

    Attributes:
        tokens: ``(B, L + T)`` prompt ids then continuation ids (``pad_token_id`` after
            an end-of-sequence token).
        logits: ``(B, T, K)`` the transformed logits each continuation token was drawn
            from (float32): the model's sampling distribution at each position.
        mask: ``(B, T)`` True on generated positions up to and including the end token.
        prompt_length: L.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor
    prompt_length: int

    @property
    def continuation(self) -> torch.Tensor:
        """``(B, T)`` the generated ids."""
        return self.tokens[:, self.prompt_length:]


def recompute_step(model_fn: Callable[[torch.Tensor], torch.Tensor]) -> StepFn:
    """A ``StepFn`` for a model without a cache: ``model_fn(ids) -> (B, L, K)`` logits.

    Each step runs the model on the whole sequence so far and takes the last position
    (quadratic in length: fine for short continuations and small models).

    Examples:
        >>> step = recompute_step(lambda ids: torch.zeros(*ids.shape, 5))
        >>> logits, state = step(torch.zeros(2, 3, dtype=torch.long), None)
        >>> tuple(logits.shape), tuple(state.shape)
        ((2, 5), (2, 3))
    """

    def step(new_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        ids = new_ids if state is None else torch.cat((state, new_ids), dim=1)
        return model_fn(ids)[:, -1], ids

    return step


def _draw(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row by inverse CDF, with uniforms from ``generator`` only.

    The uniforms are drawn on the generator's device and moved, so a CPU generator
    drives sampling on any device and the same seed gives the same tokens everywhere.
    A token of probability 0 (a ``-inf`` logit) is never drawn.
    """
    cdf = torch.softmax(logits.double(), dim=-1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=generator.device,
                   dtype=torch.float64).to(cdf.device)
    return (cdf < u * cdf[:, -1:]).sum(-1).clamp_(max=cdf.shape[-1] - 1)


def _check_generation_args(prompt_ids: Any, max_new_tokens: Any, generator: Any) -> None:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or (
        prompt_ids.is_floating_point() or prompt_ids.dtype == torch.bool
    ):
        raise TypeError(
            "`prompt_ids` must be an integer tensor of shape (batch, prompt_length), got "
            f"{getattr(prompt_ids, 'dtype', type(prompt_ids).__name__)} "
            f"{tuple(getattr(prompt_ids, 'shape', ()))}."
        )
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"`prompt_ids` is empty, shape {tuple(prompt_ids.shape)}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
        1 <= max_new_tokens <= _MAX_NEW_TOKENS
    ):
        raise ValueError(
            f"`max_new_tokens` must be an int in [1, {_MAX_NEW_TOKENS}], got {max_new_tokens!r}."
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "`generator` must be a torch.Generator (the monitor's own RNG, e.g. "
            f"torch.Generator().manual_seed(0)), got {type(generator).__name__}."
        )


def sample_continuations(
    step: StepFn,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    generator: torch.Generator,
    transform: SamplingTransform | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> Generation:
    """Sample ``max_new_tokens`` (at most) after each prompt, drawing only from ``generator``.

    Runs under ``torch.no_grad()``; put the model in eval mode (the monitor does): dropout
    in train mode would draw from the global RNG. After ``eos_token_id`` a row gets
    ``pad_token_id`` and mask False; when every row has ended, sampling stops and the
    rest is padding (shapes stay ``(B, max_new_tokens)``).

    Args:
        step: the model as a ``StepFn`` (``recompute_step(model_fn)`` for a plain model).
        prompt_ids: ``(B, L)`` integer prompt ids.
        max_new_tokens: T, at most 4096.
        generator: the RNG of the samples (any device; uniforms are moved).
        transform: temperature/top-k/top-p; the returned logits are after it.
        eos_token_id: end-of-sequence id, or None.
        pad_token_id: id written after the end of a sequence.

    Returns:
        A ``Generation``.

    Examples:
        >>> step = recompute_step(lambda ids: torch.zeros(*ids.shape, 3))
        >>> gen = sample_continuations(step, torch.zeros(2, 1, dtype=torch.long), 4,
        ...                            generator=torch.Generator().manual_seed(0))
        >>> tuple(gen.tokens.shape), tuple(gen.logits.shape), bool(gen.mask.all())
        ((2, 5), (2, 4, 3), True)
    """
    _check_generation_args(prompt_ids, max_new_tokens, generator)
    transform = transform or SamplingTransform()
    batch, length = prompt_ids.shape
    new, state = prompt_ids, None
    tokens, logits, alive = [], [], torch.ones(batch, dtype=torch.bool, device=prompt_ids.device)
    masks = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            raw, state = step(new, state)
            scores = transform(raw)
            token = _draw(scores, generator).to(prompt_ids.device)
            token = torch.where(alive, token, torch.full_like(token, pad_token_id))
            tokens.append(token)
            logits.append(scores)
            masks.append(alive.clone())
            if eos_token_id is not None:
                alive = alive & (token != eos_token_id)
                if not bool(alive.any()):
                    break
            new = token.unsqueeze(1)
    return _padded(prompt_ids, tokens, logits, masks, max_new_tokens, pad_token_id)


def _padded(prompt_ids, tokens, logits, masks, total, pad_token_id) -> Generation:
    """Stack the steps and pad a stopped-early generation to ``total`` positions."""
    missing = total - len(tokens)
    cont = torch.stack(tokens, 1)
    scores = torch.stack(logits, 1)
    mask = torch.stack(masks, 1)
    if missing:
        batch = cont.shape[0]
        cont = torch.cat((cont, cont.new_full((batch, missing), pad_token_id)), 1)
        scores = torch.cat((scores, scores.new_zeros(batch, missing, scores.shape[-1])), 1)
        mask = torch.cat((mask, mask.new_zeros(batch, missing)), 1)
    tokens = torch.cat((prompt_ids, cont.to(prompt_ids.dtype)), 1)
    return Generation(tokens, scores, mask, prompt_ids.shape[1])


@contextmanager
def _inference(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; every submodule's own training flag restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _hf_step(model: Any, prompt_mask: torch.Tensor) -> StepFn:
    """A cached ``StepFn`` for a ``transformers`` causal LM with left-padded prompts."""
    params = inspect.signature(model.forward).parameters
    # transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated)
    cache_arg = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def step(new_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        if state is None:
            mask, past = prompt_mask, None
            pos = _positions(mask)
        else:
            past, mask, last = state
            mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), 1)
            pos = last + 1
        out = model(input_ids=new_ids, attention_mask=mask, position_ids=pos,
                    use_cache=True, **{cache_arg: past}, **extra)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        return out.logits[:, -1], (cache, mask, pos[:, -1:])

    return step


def _check_prompt_mask(input_ids: torch.Tensor, attention_mask: Any) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` must be a tensor of the prompts' shape {tuple(input_ids.shape)}, "
            f"got {tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}."
        )
    if not bool((attention_mask[:, -1] != 0).all()):
        raise ValueError(
            "prompts must be left-padded for generation (every row's last position a real "
            "token); set `tokenizer.padding_side = 'left'` for the held-out prompts."
        )
    return attention_mask.long()


def hf_generation_inputs(
    model: Any,
    reference: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    generator: torch.Generator,
    transform: SamplingTransform | None = None,
    reference_transform: SamplingTransform | None = None,
    groups: torch.Tensor | None = None,
    max_batch: int = 64,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> KLInputs:
    """``KLInputs`` on a ``transformers`` causal LM's own generations (``sampled_from="model"``).

    Samples continuations of the prompts from ``model``, scores them with ``reference`` and
    keeps both logits ``(B, T, K)`` on the generated part (more: ``kl_monitor.generation``).

    Args:
        model: the policy (``transformers`` ``PreTrainedModel`` with an LM head).
        reference: the reference model, same vocabulary.
        input_ids: ``(B, L)`` prompt ids, left-padded.
        attention_mask: ``(B, L)`` 1 for real tokens, 0 for left padding.
        max_new_tokens: continuation length T (at most 4096).
        generator: the monitor's own RNG.
        transform: the model's sampling transform.
        reference_transform: transform applied to the reference logits.
        groups: optional ``(B,)`` integer label per prompt (prompt type).
        max_batch: prompts generated together (bounds memory: ``max_batch × T × K``).
        eos_token_id: end of sequence, or None (always ``max_new_tokens``).
        pad_token_id: id written after the end (default: ``eos_token_id`` or 0).

    Returns:
        ``KLInputs.from_logits(reference, model, mask, groups, sampled_from="model")``.
    """
    _check_generation_args(input_ids, max_new_tokens, generator)
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"`max_batch` must be an int >= 1, got {max_batch!r}.")
    prompt_mask = _check_prompt_mask(input_ids, attention_mask)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    ref_t = reference_transform or SamplingTransform()
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    with _inference(model, reference):
        for start in range(0, input_ids.shape[0], max_batch):
            ids = input_ids[start:start + max_batch]
            mask = prompt_mask[start:start + max_batch]
            gen = sample_continuations(
                _hf_step(model, mask), ids, max_new_tokens, generator=generator,
                transform=transform, eos_token_id=eos_token_id, pad_token_id=pad,
            )
            full = torch.cat((mask, mask.new_ones(gen.mask.shape)), 1)
            out = reference(input_ids=gen.tokens, attention_mask=full,
                            position_ids=_positions(full))
            length = gen.prompt_length
            ref_logits = ref_t(out.logits[:, length - 1:-1])
            parts.append((ref_logits, gen.logits.to(ref_logits.dtype), gen.mask))
    ref, mod, keep = (torch.cat(x, 0) for x in zip(*parts, strict=True))
    return KLInputs.from_logits(ref, mod, mask=keep, groups=groups, sampled_from="model")
