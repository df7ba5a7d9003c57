"""Two processes (``accelerate launch --cpu``, gloo) take exactly the optimiser steps of one process.

The same global batch of trajectories, the same tiny Qwen3 and the same seeded micro-batch order go
through :func:`~unipost.train.optimise.optimise_epoch` once in this process and once split over two
processes by :class:`~unipost.train.distributed.Distributed` (DDP through accelerate). After two
AdamW steps (three and two micro-batches: the first step is uneven, so one rank also runs a
zero-weighted pad) the last step's gradients and the updated weights must agree within fp32
rounding: ``atol = 1e-6`` on gradients (their scale here is ~1e-2..1) and on weights.

Recipes: DAgger (``token_mean``: the normaliser is the step's label-token count over both ranks), GRPO
(group statistics: groups stay whole inside one micro-batch) and GRPO with ``sequence_mean``; all
three under DDP (``accelerator.prepare``), DAgger also under FSDP2 (``torch.distributed.fsdp.
fully_shard`` on gloo through :meth:`Distributed.prepare_fsdp2`: accelerate 1.x runs a CPU launch as
DDP whatever its FSDP plugin says).
This file is also the worker script the launcher runs (``__main__`` below).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `factories` when run as the worker script

from factories import TOOLS, make_trajectory, session_cache

WORLD = 2
ATOL = 1e-6  # gradients
# Weights after 2 AdamW steps at lr 1e-2: Adam's g / (sqrt(v) + eps) amplifies fp32 reduction-order noise
# on near-zero gradient entries (measured up to 1.5e-6 on a fresh CI venv, 1.2e-7 on another machine);
# a logic error (per-rank normaliser, lost micro-batch) moves weights by ~lr = 1e-2.
WEIGHT_ATOL = 1e-5
# The Trainer test takes 4 AdamW steps at lr 1e-2: Adam's g / (sqrt(v) + 1e-8) turns fp32 reduction-
# order noise (~1e-8) on near-zero gradient entries into ~1e-6 weight noise (measured 4.3e-6); a wrong
# normaliser or a lost micro-batch moves weights by ~lr = 1e-2.
TRAINER_ATOL = 2e-5
MICRO_BATCHES_PER_STEP = 3  # 5 micro-batches -> steps of 3 and 2
CASES = ("dagger", "grpo", "grpo_sequence_mean", "dagger_fsdp2")
TINY2 = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}


def global_batch(case: str):
    """Five groups of unequal length, each its own micro-batch (micro_batch_tokens is tiny)."""
    if case.startswith("dagger"):
        executors = ["tst", "ssts", "ts", "sstss", "st"]
        return [make_trajectory(e, task_id=f"t{i}", seed=i) for i, e in enumerate(executors)]
    rewards = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.25, 0.75, 0.0]
    return [
        make_trajectory("sss"[: 1 + i % 3], task_id=f"g{i // 2}", seed=i, reward=r, meta={"group": i // 2})
        for i, r in enumerate(rewards)
    ]


def recipe_for(case: str):
    from unipost.objective import GRPO, DAgger

    if case.startswith("dagger"):
        return DAgger(beta=0.5)
    recipe = GRPO(group_size=2)
    if case == "grpo_sequence_mean":
        recipe = dataclasses.replace(recipe, normalization="sequence_mean")
    return recipe


def train_two_steps(assets: Path, case: str, dist=None) -> dict[str, dict[str, torch.Tensor]]:
    """Two optimiser steps on the case's global batch; returns last gradients and updated weights."""
    from transformers import PreTrainedTokenizerFast

    from unipost.models import build_tiny_qwen3
    from unipost.models.tiny import load_template
    from unipost.rendering.chat import ChatRenderer
    from unipost.train.optimise import make_microbatches, optimise_epoch

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(assets / "tokenizer"))
    tokenizer.chat_template = load_template()
    model = build_tiny_qwen3(len(tokenizer), **TINY2)
    model.load_state_dict(torch.load(assets / "model.pt"))
    recipe = recipe_for(case)
    batches = make_microbatches(
        global_batch(case), recipe, ChatRenderer(tokenizer, TOOLS), max_tokens=64, vocab_size=len(tokenizer)
    )
    assert len(batches) == 5, len(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if dist is not None and case.endswith("fsdp2"):
        _, optimizer = dist.prepare_fsdp2(model, optimizer)
    elif dist is not None:
        _, optimizer = dist.prepare(model, optimizer)
    if dist is not None:  # the Trainer refuses sharded parameters (its rollouts run on one process)
        assert dist.shards_parameters == case.endswith("fsdp2")
        if dist.shards_parameters:
            with pytest.raises(NotImplementedError, match="shards its parameters"):
                dist.require_replicated("the Trainer's rollouts")
    stats = optimise_epoch(
        model,
        batches,
        recipe,
        optimizer,
        generator=torch.Generator().manual_seed(3),
        grad_accumulation=MICRO_BATCHES_PER_STEP,
        grad_clip=1.0,
        dist=dist,
    )
    assert stats["updates"] == 2.0
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t.clone()  # FSDP2: gather shards
    return {
        "grad": {n: full(p.grad.detach()) for n, p in model.named_parameters()},
        "weight": {n: full(p.detach()) for n, p in model.named_parameters()},
        "metrics": {k: torch.tensor(v) for k, v in stats.items()},
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from unipost.models import build_tiny_qwen3, build_tokenizer

    path = tmp_path_factory.mktemp("dist")
    tokenizer = build_tokenizer(vocab_size=512)
    tokenizer.save_pretrained(str(path / "tokenizer"))
    model = build_tiny_qwen3(len(tokenizer), **TINY2, seed=5)
    torch.save(model.state_dict(), path / "model.pt")
    return path


def launch(assets: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2`` on this file; the worker's ``Accelerator(cpu=True)`` uses gloo.

    torchrun, not ``accelerate launch``: accelerate 1.x launches multi-CPU jobs only through mpirun
    (``--cpu --num_processes 2`` silently starts ONE process); on GPUs ``accelerate launch
    --config_file configs/accelerate/ddp.yaml`` starts the same workers (docs/scaling.md).

    ``--standalone``: torchrun's agent binds its rendezvous store and the workers' store to port 0 and
    keeps them open, so no port is chosen before it is bound; a port probed here and handed over as
    ``--master_port`` could be taken by another pytest-xdist worker in between.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nproc_per_node", str(WORLD), "--local-addr", "127.0.0.1",
        __file__, str(assets), *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_process_results(assets):
    proc = launch(assets)
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {case: torch.load(assets / f"{case}.pt") for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(assets, two_process_results, case):
    torch.set_num_threads(1)
    one = train_two_steps(assets, case.removesuffix("_fsdp2"))
    two = two_process_results[case]
    worst = {}
    for what in ("grad", "weight"):
        for name, ref in one[what].items():
            diff = (two[what][name] - ref).abs().max().item()
            worst[what] = max(worst.get(what, 0.0), diff)
            tol = ATOL if what == "grad" else WEIGHT_ATOL
            assert diff <= tol, f"{case}: {what} of {name} differs by {diff:.3g} (tol {tol})"
    print(f"{case}: max |grad diff| {worst['grad']:.2g}, max |weight diff| {worst['weight']:.2g}")
    # the test can fail: the step really moved the weights and the gradients are not ~0
    initial = torch.load(assets / "model.pt")
    moved = max((one["weight"][n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 100 * WEIGHT_ATOL
    assert max(g.abs().max().item() for g in one["grad"].values()) > 1e-3
    for key in ("loss", "label_tokens", "labels"):
        torch.testing.assert_close(two["metrics"][key], one["metrics"][key], atol=1e-5, rtol=1e-6)


def test_naive_per_rank_normaliser_would_differ(assets, two_process_results):
    """The check has teeth: averaging per-rank token means (a naive DDP loss) moves the gradients."""
    from unipost.train import optimise

    original = optimise._scale
    try:  # each micro-batch normalised by its own tokens, as a naive per-rank token mean would be
        optimise._scale = lambda batch, recipe, totals: 1.0 / MICRO_BATCHES_PER_STEP
        naive = train_two_steps(assets, "dagger")
    finally:
        optimise._scale = original
    two = two_process_results["dagger"]
    diff = max((two["grad"][n] - g).abs().max().item() for n, g in naive["grad"].items())
    assert diff > 100 * ATOL


def trainer_config(output_dir: Path, cache_dir: Path, name: str):
    """One DAgger iteration (student and teacher both act), 3 episodes -> 3 micro-batches, steps of 2."""
    from factories import tiny_train_config

    from unipost.train.config import OptimConfig, RolloutConfig

    kwargs = {"beta": 0.5, "filter_unsubmitted": False}  # a random-init student rarely submits
    config = tiny_train_config(output_dir, cache_dir, "dagger", recipe_kwargs=kwargs, iterations=1)
    return config.replace(
        name=name,
        rollout=RolloutConfig(episodes_per_iteration=3, max_turns=6, max_new_tokens=16),
        optim=OptimConfig(lr=1e-2, micro_batch_tokens=64, grad_accumulation=2, epochs_per_batch=2),
    )


@pytest.mark.sandbox
def test_trainer_two_processes_equal_one(tmp_path):
    """The whole Trainer under torchrun: main-process rollouts broadcast, data-parallel steps, rank-0
    checkpoint. The same rollouts, losses (rel 1e-5) and final weights (TRAINER_ATOL) as one process."""
    from unipost.train.checkpoint import CheckpointManager
    from unipost.train.trainer import Trainer

    cache = Path(session_cache())
    one = Trainer(trainer_config(tmp_path, cache, "one"))
    one.fit()
    config_file = tmp_path / "two.json"
    config_file.write_text(trainer_config(tmp_path, cache, "two").to_json())
    proc = launch(config_file, "trainer")
    assert proc.returncode == 0, f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    two = Trainer(trainer_config(tmp_path, cache, "two"), resume=True)  # loads rank 0's checkpoint
    assert two.start_iteration == 1
    assert CheckpointManager(tmp_path / "two" / "checkpoints").latest() is not None
    pairs = zip(one.student.parameters(), two.student.parameters(), strict=True)
    worst = max((p2 - p1).abs().max().item() for p1, p2 in pairs)
    print(f"trainer: max |weight diff| 1 vs 2 processes {worst:.2g}")
    assert worst <= TRAINER_ATOL
    losses = [(h1["train/loss"], h2["train/loss"]) for h1, h2 in zip(one.history, two.history, strict=True)]
    for loss_one, loss_two in losses:
        assert loss_two == pytest.approx(loss_one, rel=1e-5)
    ones = [json.loads(line) for line in (tmp_path / "one" / "trajectories.jsonl").read_text().splitlines()]
    twos = [json.loads(line) for line in (tmp_path / "two" / "trajectories.jsonl").read_text().splitlines()]
    assert len(twos) == 3  # one store, written by the main process only
    # the same rollouts were trained on: every action, label and observation equal; the sampled tokens'
    # log-probs equal up to fp32 reduction order (this process and the torchrun workers may use
    # different thread counts: measured 5e-7 apart)
    logps = [[t.pop("action_logprobs") for t in traj["turns"]] for traj in ones + twos]
    assert [t["turns"] for t in twos] == [t["turns"] for t in ones]
    for a, b in zip(logps[: len(ones)], logps[len(ones) :], strict=True):
        for x, y in zip(a, b, strict=True):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, abs=1e-5)), (x, y)


def _trainer_worker(config_file: Path) -> None:
    from unipost.train.config import TrainConfig
    from unipost.train.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig.from_file(config_file))
    assert trainer.dist is not None and trainer.dist.world_size == WORLD
    trainer.fit()
    trainer.dist.barrier()
    trainer.dist.end()


def _worker(assets: Path) -> None:
    from unipost.train.distributed import Distributed

    torch.set_num_threads(1)
    dist = Distributed.from_environment()
    assert dist is not None and dist.world_size == WORLD, dist
    for case in CASES:
        result = train_two_steps(assets, case, dist)
        if dist.is_main:
            torch.save(result, assets / f"{case}.pt")
        dist.barrier()
    dist.end()


if __name__ == "__main__":
    if sys.argv[2:] == ["trainer"]:
        _trainer_worker(Path(sys.argv[1]))
    else:
        _worker(Path(sys.argv[1]))
