"""The fused head inside HF's Trainer and TRL's SFTTrainer equals their own loss, gradients included."""

from __future__ import annotations

import pytest
import torch

from unipost.kernels.hf import FusedLossMixin, causal_lm_token_logprobs, fused_causal_lm_loss
from unipost.models import build_tiny_qwen3


def padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g)
        input_ids[i, :n], attention[i, :n] = ids, 1
        labels[i, n // 2 : n] = ids[n // 2 :]  # loss on the second half ("completion")
    return input_ids, attention, labels


def test_fused_loss_equals_hf_loss_with_padding(tiny_model):
    ids, mask, labels = padded_batch(tiny_model.config.vocab_size, [17, 9, 23])
    ours = fused_causal_lm_loss(tiny_model, ids, labels, mask)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    theirs = tiny_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(ours_grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # num_items_in_batch semantics: sum / n
    total = fused_causal_lm_loss(tiny_model, ids, labels, mask, num_items_in_batch=7)
    n_valid = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, ours.detach() * n_valid / 7, atol=1e-5, rtol=1e-5)


def test_token_logprobs_zero_on_ignored(tiny_model):
    ids, mask, labels = padded_batch(tiny_model.config.vocab_size, [12, 5])
    with torch.no_grad():
        logp = causal_lm_token_logprobs(tiny_model, ids, labels, mask)
    assert logp.shape == (2, 11)
    assert torch.all(logp[labels[:, 1:] == -100] == 0)
    assert torch.all(logp[labels[:, 1:] != -100] < 0)
    with pytest.raises(ValueError, match="differ in shape"):
        causal_lm_token_logprobs(tiny_model, ids, labels[:, :-1])


def _train(trainer_cls, vocab_size, tmp_path, name):
    from transformers import TrainingArguments

    model = build_tiny_qwen3(vocab_size, seed=5)
    rows = []
    for i in range(8):
        ids, mask, labels = padded_batch(vocab_size, [10 + i], seed=i)
        rows.append({"input_ids": ids[0], "attention_mask": mask[0], "labels": labels[0]})

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)

        def pad(key, value):
            return torch.stack(
                [torch.nn.functional.pad(r[key], (0, width - len(r[key])), value=value) for r in batch]
            )

        return {
            "input_ids": pad("input_ids", 0),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=0.5,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        lr_scheduler_type="constant",
        optim="sgd",  # Adam amplifies 1e-7 gradient noise on near-zero gradients; SGD compares cleanly
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=rows, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, losses


def test_hf_trainer_with_fused_loss_matches_plain_trainer(tokenizer, tmp_path):
    from transformers import Trainer

    class FusedTrainer(FusedLossMixin, Trainer):
        pass

    plain_model, plain_losses = _train(Trainer, len(tokenizer), tmp_path, "plain")
    fused_model, fused_losses = _train(FusedTrainer, len(tokenizer), tmp_path, "fused")
    assert len(plain_losses) == 2
    assert fused_losses == pytest.approx(plain_losses, abs=1e-4)
    for (n, p), (_, q) in zip(plain_model.named_parameters(), fused_model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


def test_trl_sft_trainer_with_fused_loss(tokenizer, tmp_path):
    pytest.importorskip("trl", reason="TRL is an extra: pip install 'unipost[trl]' (dev includes it)")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    calls = []

    class FusedSFTTrainer(FusedLossMixin, SFTTrainer):
        def compute_loss(self, *args, **kwargs):
            calls.append(1)
            return super().compute_loss(*args, **kwargs)

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
            ]
        }
        for i in range(6)
    ]
    losses = {}
    for name, cls in [("plain", SFTTrainer), ("fused", FusedSFTTrainer)]:
        config = SFTConfig(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=3,
            max_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            lr_scheduler_type="constant",
            assistant_only_loss=False,
            bf16=False,  # TRL defaults to bf16 autocast; compare in fp32 (gradient checkpointing stays on)
        )
        trainer = cls(
            model=build_tiny_qwen3(len(tokenizer), seed=7),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        trainer.train()
        losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(calls) == 2  # the fused loss really ran, once per step
    assert losses["fused"] == pytest.approx(losses["plain"], abs=1e-4)
