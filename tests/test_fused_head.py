"""Which LM-head path the Trainer runs, and that both give the same training loss and gradients.

``objective_loss(head="auto")`` runs the three-GEMM fused loss for recipes whose loss is a sum of
per-token terms (``Recipe.logp_scope`` "none" or "token": every built-in recipe, ratio clipping
included) and the four-GEMM ``token_logprobs`` where a part reads other tokens' log-probs ("batch") or
does not say. Stated tolerance: loss and every parameter gradient equal between the heads to 1e-5
absolute (1e-4 relative) in fp32, the tolerance tests/test_objective_loss.py holds each head to against
separate forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from factories import TOOLS, make_trajectory

from unipost.batch import build_batch, objective_loss, select_head
from unipost.kernels.model import packed_logprobs
from unipost.models import build_tiny_qwen3
from unipost.objective import (
    GRPO,
    OPD,
    SFT,
    DAgger,
    EntropyBonus,
    KLToReference,
    OwnSamples,
    Recipe,
    StudentRollout,
    Uniform,
)
from unipost.objective.scores import ScoreInputs
from unipost.rendering.chat import ChatRenderer


@dataclass(frozen=True)
class BatchCentredLogp:
    """A weight that needs the whole batch: w_t = logp_t - mean_batch(logp) (a batch baseline)."""

    needs: ClassVar[frozenset] = frozenset()
    requires_own_samples: ClassVar[bool] = True
    logp_scope: ClassVar[str] = "batch"

    def __call__(self, ctx: ScoreInputs) -> torch.Tensor:
        return (ctx.logp_L - ctx.logp_L.mean()).detach()


@dataclass(frozen=True)
class Undeclared:
    """A user's score that does not say what it reads (no ``logp_scope``): taken as "batch"."""

    needs: ClassVar[frozenset] = frozenset()
    requires_own_samples: ClassVar[bool] = False

    def __call__(self, ctx: ScoreInputs) -> torch.Tensor:
        return torch.ones_like(ctx.logp_L)


def _own(score, **kw) -> Recipe:
    return Recipe(StudentRollout(), OwnSamples(), score, **kw)


@pytest.fixture()
def renderer(tokenizer):
    return ChatRenderer(tokenizer, TOOLS)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        (SFT(), "fused_loss"),
        (DAgger(), "fused_loss"),
        (GRPO(group_size=2), "fused_loss"),
        (GRPO(group_size=2, ratio_clip=0.2, kl_coef=0.05), "fused_loss"),  # per-token ratio and k3
        (OPD(), "fused_loss"),  # the token's own log-ratio
        (_own(Uniform(), regularizer=EntropyBonus(0.01) + KLToReference(0.1)), "fused_loss"),
        (_own(BatchCentredLogp()), "logprobs"),  # needs every log-prob of the batch first
        (_own(Undeclared()), "logprobs"),  # unknown: the path that is right for any loss
        (_own(Uniform() * BatchCentredLogp()), "logprobs"),  # a product is as wide as its widest factor
    ],
)
def test_auto_picks_three_gemms_for_per_token_losses_and_four_otherwise(recipe, expected):
    assert select_head(recipe, "auto", device="cpu", dtype=torch.float32) == expected
    assert select_head(recipe, "logprobs") == "logprobs"


def test_forcing_the_fused_loss_on_a_batch_loss_is_an_error_and_cuda_keeps_triton(monkeypatch):
    with pytest.raises(ValueError, match="per-token terms"):
        select_head(_own(BatchCentredLogp()), "fused_loss")
    with pytest.raises(ValueError, match="head must be one of"):
        select_head(SFT(), "three")
    import unipost.kernels.logprobs as lp

    monkeypatch.setattr(lp, "select_logprobs_backend", lambda device, dtype, backend="auto": "triton")
    assert select_head(SFT(), "auto", device="cuda", dtype=torch.bfloat16) == "logprobs"


def _loss_and_grads(model, batch, recipe, head, **kw):
    model.zero_grad()
    loss, metrics = objective_loss(model, batch, recipe, head=head, **kw)
    loss.backward()
    return loss.detach(), metrics, {k: p.grad.clone() for k, p in model.named_parameters()}


def _same_training(model, batch, recipe, **kw):
    loss3, m3, g3 = _loss_and_grads(model, batch, recipe, "fused_loss", **kw)
    loss4, m4, g4 = _loss_and_grads(model, batch, recipe, "logprobs", **kw)
    assert m3["head_three_gemm"] == 1.0 and m4["head_three_gemm"] == 0.0
    torch.testing.assert_close(loss3, loss4, atol=1e-5, rtol=0)
    for k in g4:
        torch.testing.assert_close(g3[k], g4[k], atol=1e-5, rtol=1e-4, msg=k)
    for k in ("nll", "regularizer", "mean_logp", "mean_weight", "label_tokens"):
        assert m3[k] == pytest.approx(m4[k], abs=1e-5), k
    return m3, m4


def test_same_loss_and_gradients_sft_dagger(tiny_model, renderer):
    trajs = [make_trajectory("tstss", seed=0), make_trajectory("sst", seed=5, resolved=False)]
    for recipe in (DAgger(), SFT(rejection_sampling=False)):
        _same_training(tiny_model, build_batch(trajs, recipe, renderer), recipe)


def test_same_loss_and_gradients_grpo_ratio_clipped_with_kl_and_entropy(tiny_model, renderer, tokenizer):
    rewards = [1.0, 0.0, 0.0, 1.0]
    trajs = [make_trajectory("ss", task_id="a", seed=i, reward=r) for i, r in enumerate(rewards)]
    recipe = Recipe(
        StudentRollout(group_size=4), OwnSamples(), GRPO(group_size=4).score,
        EntropyBonus(0.05) + KLToReference(0.2), ratio_clip=0.2, normalization="sequence_mean",
    )  # fmt: skip
    batch = build_batch(trajs, recipe, renderer)
    with torch.no_grad():
        logp = packed_logprobs(tiny_model, batch.packed).logp_L
    batch.old_logp_L = logp - torch.linspace(-0.5, 0.5, logp.numel())  # some ratios clipped
    reference = build_tiny_qwen3(len(tokenizer), seed=3)
    m3, m4 = _same_training(tiny_model, batch, recipe, reference=reference)
    assert 0 < m3["ratio_clipped_frac"] == m4["ratio_clipped_frac"] < 1


def test_same_loss_and_gradients_opd(tiny_model, renderer, tokenizer):
    teacher = build_tiny_qwen3(len(tokenizer), seed=11)
    trajs = [make_trajectory("sss", seed=0), make_trajectory("ss", seed=4)]
    recipe = OPD(clip=0.5)
    m3, m4 = _same_training(tiny_model, build_batch(trajs, recipe, renderer), recipe, teacher=teacher)
    assert m3["reverse_kl_sampled"] == pytest.approx(m4["reverse_kl_sampled"], abs=1e-6)


def test_batch_scope_recipe_runs_four_gemms_under_auto(tiny_model, renderer):
    recipe = _own(BatchCentredLogp())
    batch = build_batch([make_trajectory("sss", seed=0)], recipe, renderer)
    _, metrics = objective_loss(tiny_model, batch, recipe)
    assert metrics["head_three_gemm"] == 0.0


def test_trainer_picks_the_path_per_recipe_and_config(tmp_path):
    """optimise_epoch (what the Trainer runs every epoch) reports the head it ran, per recipe and config."""
    from unipost.models import build_tokenizer
    from unipost.train.optimise import optimise_epoch

    tokenizer = build_tokenizer()
    renderer = ChatRenderer(tokenizer, TOOLS)
    trajs = [make_trajectory("tst", seed=1), make_trajectory("st", seed=2)]
    runs = {}
    for name, recipe, head in (
        ("dagger auto", DAgger(), "auto"),
        ("dagger forced four", DAgger(), "logprobs"),
        ("batch auto", _own(BatchCentredLogp()), "auto"),
    ):
        model = build_tiny_qwen3(len(tokenizer), seed=0)
        batch = build_batch(trajs, recipe, renderer)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = optimise_epoch(model, [batch], recipe, opt, grad_clip=None, head=head)
        runs[name] = (stats, {k: p.detach().clone() for k, p in model.named_parameters()})
    assert runs["dagger auto"][0]["head_three_gemm"] == 1.0
    assert runs["dagger forced four"][0]["head_three_gemm"] == 0.0
    assert runs["batch auto"][0]["head_three_gemm"] == 0.0
    # one SGD step either way: the same loss and the same updated parameters
    (s3, p3), (s4, p4) = runs["dagger auto"], runs["dagger forced four"]
    assert s3["loss"] == pytest.approx(s4["loss"], abs=1e-5)
    for k in p4:
        torch.testing.assert_close(p3[k], p4[k], atol=1e-6, rtol=1e-5, msg=k)


def test_config_head_field_reaches_the_trainer():
    from unipost.train.config import OptimConfig

    assert OptimConfig().head == "auto"
    assert OptimConfig(head="logprobs").head == "logprobs"
    with pytest.raises(ValueError):
        OptimConfig(head="three")
