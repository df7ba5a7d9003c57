"""Everything a CPU run needs before its first iteration, built locally and cached.

* the tokenizer: byte-level BPE trained on expert trajectories of the embedded environment (rendered
  with the project's chat template), so task text compresses well and nothing is downloaded;
* the student's warm start: brief behaviour cloning on a few expert demos. The paper's students are
  instruction-tuned models that already speak the tool-call format; a random-init tiny model does
  not, so every method starts from the same cached warm start (our "instruct" stage);
* the white-box teacher LM: a student-shaped model distilled from many expert trajectories, used as
  pi_T by OPD's log-ratio and by the reverse-KL diagnostic (the scripted expert has actions, not
  log-probs, exactly like an API teacher).

Caches are keyed by a hash of everything that determines their content, under ``cache_dir``
(default ``$UNIPOST_CACHE`` or ``~/.cache/unipost``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from unipost.data import Trajectory, cache_root
from unipost.envs.embedded.expert import ScriptedExpert
from unipost.envs.embedded.tools import tool_schemas
from unipost.envs.registry import embedded_env_factory as env_factory
from unipost.models import build_tiny_qwen3, build_tokenizer
from unipost.objective import SFT, Recipe
from unipost.rendering.chat import ChatRenderer
from unipost.rollout.engine import RolloutEngine

__all__ = [
    "behaviour_clone",
    "build_task_tokenizer",
    "cache_root",
    "cached_clones",
    "env_factory",
    "expert_trajectories",
]

SETUP_VERSION = "2"  # bump when what is cached here changes meaning


def _key(*parts: Any) -> str:
    blob = json.dumps([SETUP_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def expert_trajectories(
    n: int,
    *,
    difficulty: str,
    max_observation_chars: int,
    split: str = "train",
    start: int = 0,
    max_turns: int = 40,
    progress: bool = False,
    prompt_tools: bool = True,
) -> list[Trajectory]:
    """Scripted-expert trajectories on tasks ``start .. start+n-1`` of ``split`` (``prompt_tools=False``:
    rendered without the tool-schema block, as the tiny lab's students see their prompts)."""
    engine = RolloutEngine(
        env_factory(difficulty, max_observation_chars, prompt_tools=prompt_tools),
        student=None,
        teacher=ScriptedExpert(),
        recipe=SFT(rejection_sampling=False),
        max_turns=max_turns,
        concurrency=8,
        progress=progress,
    )
    return engine.collect([(split, start + i) for i in range(n)], iteration=0).trajectories


def build_task_tokenizer(
    vocab_size: int, *, difficulty: str, max_observation_chars: int, cache_dir: str | None = None
):
    """A BPE tokenizer trained on rendered expert trajectories (cached as tokenizer.json)."""
    from transformers import PreTrainedTokenizerFast

    from unipost.models.tiny import load_template

    path = cache_root(cache_dir) / f"tokenizer-{_key('tok', vocab_size, difficulty, max_observation_chars)}"
    if (path / "tokenizer.json").exists():
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        except Exception:  # a copy left half-written by an older unipost: build it again below
            shutil.rmtree(path, ignore_errors=True)
        else:
            tok.chat_template = load_template()
            return tok
    demos = expert_trajectories(
        24, difficulty=difficulty, max_observation_chars=max_observation_chars, start=10_000
    )
    plain = build_tokenizer(vocab_size=256 + 16)  # only to render text with the chat template
    renderer = ChatRenderer(plain, tool_schemas())
    corpus = [renderer.render_text(t.messages(), add_generation_prompt=False) for t in demos]
    tok = build_tokenizer(corpus, vocab_size=vocab_size)
    # Written whole or not at all: saved into a private folder, then renamed into place, so a process
    # killed mid-save (or another process building the same key at the same time) never leaves a
    # half-written tokenizer.json that every later run would fail to load.
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not (path / "tokenizer.json").exists():
        shutil.rmtree(path, ignore_errors=True)  # an older unipost's partial save: no tokenizer.json
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another process renamed its copy first: theirs is as good as ours
            if not (path / "tokenizer.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def behaviour_clone(
    model: torch.nn.Module,
    trajectories: Sequence[Trajectory],
    renderer: ChatRenderer,
    *,
    epochs: int,
    lr: float,
    micro_batch_tokens: int = 4096,
    seed: int = 0,
    progress: bool = False,
    recipe: Recipe | None = None,
) -> list[float]:
    """Plain SFT on teacher trajectories through the same packed kernel; returns the epoch losses."""
    from unipost.train.optimise import make_microbatches, optimise_epoch

    recipe = recipe or SFT(rejection_sampling=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    batches = make_microbatches(trajectories, recipe, renderer, max_tokens=micro_batch_tokens)
    losses = []
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        stats = optimise_epoch(model, batches, recipe, optimizer, generator=generator, grad_clip=1.0)
        losses.append(stats["loss"])
        if progress:
            print(f"  behaviour cloning epoch {epoch + 1}/{epochs}: loss {stats['loss']:.3f}")
    return losses


def cached_clones(
    model_kwargs: dict[str, Any],
    tokenizer: Any,
    *,
    demos: int,
    snapshots: Sequence[int],
    lr: float,
    difficulty: str,
    max_observation_chars: int,
    tools: list[dict] | None,
    cache_dir: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[int, torch.nn.Module]:
    """Tiny Qwen3 models behaviour-cloned on the same ``demos`` expert trajectories, one per epoch count
    in ``snapshots`` (0 = the random init), from ONE training run, each cached by its recipe.

    The student's warm start and the white-box teacher come from the same run (e.g. epochs 2 and 8):
    the teacher is the same network trained longer, which halves the set-up cost of a CPU run.
    """
    from safetensors.torch import load_model, save_model

    vocab_hash = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:12]
    key = _key("clone", model_kwargs, demos, lr, difficulty, max_observation_chars, vocab_hash, seed)
    root = cache_root(cache_dir)
    paths = {e: root / f"clone-{key}-epoch{e}.safetensors" for e in sorted(set(snapshots))}
    models = {e: build_tiny_qwen3(len(tokenizer), seed=seed, **model_kwargs) for e in paths}
    if all(p.exists() for p in paths.values()):
        for e, p in paths.items():
            load_model(models[e], str(p))
        return models
    model = build_tiny_qwen3(len(tokenizer), seed=seed, **model_kwargs)
    last = max(paths)
    if demos > 0 and last > 0:
        if progress:
            print(f"behaviour cloning on {demos} expert demos, {last} epochs, snapshots {sorted(paths)}")
        trajs = expert_trajectories(
            demos,
            difficulty=difficulty,
            max_observation_chars=max_observation_chars,
            start=20_000,
            progress=progress,
        )
        renderer = ChatRenderer(tokenizer, tools)
    done = 0
    for epoch in sorted(paths):
        if epoch > done and demos > 0:
            behaviour_clone(
                model, trajs, renderer, epochs=epoch - done, lr=lr, seed=seed + done, progress=progress
            )
            done = epoch
        models[epoch].load_state_dict(model.state_dict())
        tmp = paths[epoch].with_suffix(".tmp")
        save_model(models[epoch], str(tmp))
        os.replace(tmp, paths[epoch])
    return models
