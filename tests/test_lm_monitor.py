"""Rows labelled by where they came from: metric keys, and a transformers policy in Lightning."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from test_generation import VOCAB, tiny_gpt2
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor
from kl_monitor import tensorboard as tb
from kl_monitor.generation import hf_generation_inputs
from kl_monitor.metrics import CategoricalKL
from kl_monitor.sequences import sequence_kl

PROMPT, NEW = 4, 6


def _logits(b: int, t: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, k, generator=g), torch.randn(b, t, k, generator=g)


# ------------------------------------------------------------------ metric keys
def test_model_rows_give_reverse_and_a_labelled_forward():
    lp, lq = _logits(20, 5, 6, 0)
    out = CategoricalKL(reduction="sequence_sum")(lp, lq, sampled_from="model")
    est = sequence_kl(lp, lq, sampled_from="model")
    assert "forward" not in out and "asymmetry" not in out
    assert float(out["reverse"]) == pytest.approx(est.value, rel=1e-6)
    assert float(out["reverse_stderr"]) == pytest.approx(est.stderr, rel=1e-6)
    fwd_tf = float(est.teacher_forced.mean())
    assert float(out["forward_on_model_samples"]) == pytest.approx(fwd_tf, rel=1e-6)
    assert "entropy_model" in out and "entropy_reference_on_model_samples" in out


def test_reference_rows_per_sequence_label_the_reverse():
    lp, lq = _logits(20, 5, 6, 1)
    out = CategoricalKL(reduction="sequence_sum")(lp, lq, sampled_from="reference")
    assert "reverse" not in out and "reverse_on_reference_samples" in out
    assert "entropy_model_on_reference_samples" in out
    est = sequence_kl(lp, lq, sampled_from="reference")
    assert float(out["forward"]) == pytest.approx(est.value, rel=1e-6)
    # unlabelled rows, and per-token reference rows, keep today's keys and values
    legacy = CategoricalKL(reduction="sequence_sum")(lp, lq)
    assert float(legacy["reverse"]) == pytest.approx(float(est.teacher_forced.mean()), rel=1e-6)
    tok = CategoricalKL()(lp, lq, sampled_from="reference").to_floats()
    plain = CategoricalKL()(lp, lq).to_floats()
    assert {k: tok[k] for k in plain} == plain
    assert set(tok) - set(plain) == {
        "forward_shared", "forward_shared_stderr", "reverse_shared", "reverse_shared_stderr",
        "model_mass_outside", "reference_mass_outside",
    }


def test_both_sources_give_both_directions_and_their_asymmetry():
    lp, lq = _logits(20, 5, 6, 2)
    mp, mq = _logits(30, 5, 6, 3)
    metric = CategoricalKL(reduction="sequence_sum", num_groups=2)
    metric.update(lp, lq, groups=torch.arange(20) % 2, sampled_from="reference")
    metric.update(mp, mq, groups=torch.arange(30) % 2, sampled_from="model")
    out = metric.compute()
    fwd = sequence_kl(lp, lq, sampled_from="reference").value
    rev = sequence_kl(mp, mq, sampled_from="model").value
    assert float(out["forward"]) == pytest.approx(fwd, rel=1e-6)
    assert float(out["reverse"]) == pytest.approx(rev, rel=1e-6)
    assert float(out["asymmetry"]) == pytest.approx(fwd - rev, rel=1e-6)
    assert int(out["n"]) == 20 and int(out["n_model_samples"]) == 30
    rev_g1 = sequence_kl(mp[1::2], mq[1::2], sampled_from="model").value
    assert float(out["reverse/group_1"]) == pytest.approx(rev_g1, rel=1e-6)
    assert {"forward_on_model_samples", "reverse_on_reference_samples"} <= set(out)
    with pytest.raises(ValueError, match="sampled_from"):
        metric.update(lp, lq, groups=torch.arange(20) % 2, sampled_from="policy")


# ------------------------------------------------------------------ Lightning + transformers
class Policy(pl.LightningModule):
    """A tiny GPT-2 policy (dropout on) fine-tuned by next-token loss, with a frozen
    reference; the monitor sees its generations and held-out reference continuations."""

    def __init__(self, both: bool = True) -> None:
        super().__init__()
        self.model = tiny_gpt2(0).train()
        self.reference = tiny_gpt2(1).eval().requires_grad_(False)
        self.both = both
        self.kl_generator = torch.Generator().manual_seed(0)  # the monitor's own RNG

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=1e-2)

    def kl_inputs(self, batch):
        (ids,) = batch
        prompts = ids[:, :PROMPT]
        generated = hf_generation_inputs(
            self.model, self.reference, prompts, max_new_tokens=NEW,
            generator=self.kl_generator, groups=prompts[:, 0] % 2,
        )
        if not self.both:
            return generated
        ref = self.reference(input_ids=ids).logits[:, PROMPT - 1:-1]
        mod = self.model(input_ids=ids).logits[:, PROMPT - 1:-1]
        continuation = KLInputs.from_logits(ref, mod, groups=prompts[:, 0] % 2,
                                            sampled_from="reference")
        return [generated, continuation]


def _data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, PROMPT + NEW), generator=g)
    return DataLoader(TensorDataset(ids), batch_size=8, shuffle=True)


def _fit(with_monitor: bool, both: bool = True, logger=False):
    pl.seed_everything(3, verbose=False)
    module = Policy(both)
    monitor = KLMonitor(_data(16, 1), every_n_train_steps=2, max_batches=2,
                        reduction="sequence_sum", num_groups=2)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[monitor] if with_monitor else [],
    )
    trainer.fit(module, _data(64, 0))
    return module, monitor


def test_transformers_policy_in_lightning_is_bitwise_unchanged_by_the_monitor():
    a, _ = _fit(False)
    b, monitor = _fit(True)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    tags = monitor.last_result
    for key in ("forward", "reverse", "asymmetry", "forward_on_model_samples",
                "reverse_on_reference_samples", "reverse/group_0", "forward/group_1"):
        assert f"kl/{key}" in tags, key
    assert all(math.isfinite(v) for v in tags.values())


def test_generations_only_never_log_a_plain_forward(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    _, monitor = _fit(True, both=False, logger=TensorBoardLogger(tmp_path, name="run"))
    tags = monitor.last_result
    assert "kl/reverse" in tags and "kl/forward_on_model_samples" in tags
    assert "kl/forward" not in tags and "kl/asymmetry" not in tags


def test_labelled_keys_are_pinned():
    # the tag names users will have dashboards on, for generations and reference text
    lp, lq = _logits(6, 4, 5, 4)
    metric = CategoricalKL(reduction="sequence_sum", num_groups=2)
    metric.update(lp, lq, groups=torch.tensor([0, 1, 0, 1, 0, 1]), sampled_from="model")
    assert list(metric.compute()) == [
        "reverse", "reverse_stderr",
        "forward_on_model_samples", "forward_on_model_samples_stderr",
        "reverse_shared", "reverse_shared_stderr",
        "forward_shared_on_model_samples", "forward_shared_on_model_samples_stderr",
        "entropy_reference_on_model_samples", "entropy_model",
        "model_mass_outside", "reference_mass_outside", "support_violations", "nonfinite",
        "n", "n_rows",
        "reverse/group_0", "reverse_stderr/group_0", "n/group_0",
        "model_mass_outside/group_0", "reference_mass_outside/group_0",
        "reverse/group_1", "reverse_stderr/group_1", "n/group_1",
        "model_mass_outside/group_1", "reference_mass_outside/group_1",
    ]  # fmt: skip
    metric.update(lp, lq, groups=torch.tensor([0, 1, 0, 1, 0, 1]), sampled_from="reference")
    tags = list(tb.scalars("kl", metric.compute()))
    assert tags[:8] == ["kl/forward", "kl/reverse", "kl/asymmetry", "kl/forward_stderr",
                        "kl/reverse_stderr", "kl/reverse_on_reference_samples",
                        "kl/forward_on_model_samples", "kl/forward_shared"]
    assert "kl/n_model_samples" in tags and "kl/mass/group_1" in tags
    assert not any(t.endswith("_stderr") and "_on_" in t for t in tags)
