"""The tiny lab's warm start: a from-scratch student that already speaks the tool format, built once.

The paper's students are instruction-tuned models that act sensibly before any post-training; DAgger vs
SFT is only measurable from such a start. A random-init tiny Qwen3 has to learn the format, copying
(paths, names, reproduction snippets from its context) and the fixes from scripted-expert demos. That is
tens of CPU minutes, more than the README's main job may spend, so the project builds it with this
module (``scripts/build-warm-start.py``) and ships the result (``unipost/assets/tiny-lab/``, a few MB)
with a manifest: the exact build arguments, the command, content hashes of every file, the training
curve and the validation numbers. :func:`load_manifest` refuses files whose hashes differ.

What is built, from one behaviour-cloning run on ``demos`` expert trajectories (train split, indices
``DEMO_START..``; disjoint from the RL task pool ``0..train_tasks`` and from the held-out split):

* ``tokenizer``: byte-level BPE trained on the rendered demos, with unipost's ChatML tool template;
* ``student/``: the snapshot after ``student_epochs`` (the warm start every method starts from);
* ``teacher/``: the same network after ``teacher_epochs`` (> student): the white-box teacher LM that
  OPD's log-ratio and the reverse-KL diagnostic score with (the scripted expert has actions, not
  log-probs, exactly like an API teacher).

Design choices were measured on a *validation* set (train split, indices ``VALIDATION_START..``), never
on the held-out split: see benchmarks/README.md ("Warm start").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unipost.data import Trajectory

DEMO_START = 20_000  # train-split indices of the demos (the RL task pool uses 0..train_tasks)
VALIDATION_START = 900_000  # train-split indices used to choose the build's settings (never held-out)
MANIFEST = "manifest.json"
MAX_TURNS = 10  # the expert needs 6 turns on easy tasks; 4 more to recover
MAX_NEW_TOKENS = 128  # the expert's longest turn is 104 tokens
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tiny-lab"


@dataclass(frozen=True)
class WarmStartSpec:
    """Everything that determines a warm start's content (recorded in its manifest)."""

    demos: int = 2000
    student_epochs: float = 2.0
    teacher_epochs: float = 4.0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    tokenizer_vocab: int = 2048
    tokenizer_demos: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_ratio: float = 0.05
    docs_per_step: int = 8
    micro_batch_tokens: int = 4096
    difficulty: str = "easy"
    max_observation_chars: int = 1200
    seed: int = 0
    validation_tasks: int = 0  # greedy episodes on validation tasks after building (0 = skip)
    save_dtype: str = "bfloat16"  # halves the shipped files; loaded back as float32 for training
    notes: dict[str, Any] = field(default_factory=dict)


def expert_demos(spec: WarmStartSpec, *, progress: bool = False) -> list[Trajectory]:
    """Scripted-expert trajectories on the demo tasks, no tool schemas in the prompt (prompt_tools=False).

    Cached under the unipost cache as JSONL (keyed by what determines them), since a build that only
    changes the model or the epochs should not re-run thousands of sandboxed episodes.
    """
    from unipost.data import cache_root

    key = hashlib.sha256(
        json.dumps(["demos-v1", DEMO_START, spec.difficulty, spec.max_observation_chars]).encode()
    ).hexdigest()[:16]
    path = cache_root() / f"warm-start-demos-{key}.jsonl"  # task DEMO_START + i on line i
    cached = []
    if path.is_file():
        cached = [Trajectory.model_validate_json(line) for line in path.read_text().splitlines() if line]
    if len(cached) < spec.demos:
        cached += _collect_demos(spec, range(len(cached), spec.demos), progress=progress)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(t.model_dump_json() + "\n" for t in cached))
        os.replace(tmp, path)
    return cached[: spec.demos]


def _collect_demos(spec: WarmStartSpec, indices: range, *, progress: bool) -> list[Trajectory]:
    from unipost.envs.embedded.expert import ScriptedExpert
    from unipost.envs.registry import embedded_env_factory
    from unipost.objective import SFT
    from unipost.rollout.engine import RolloutEngine

    engine = RolloutEngine(
        embedded_env_factory(spec.difficulty, spec.max_observation_chars, prompt_tools=False),
        student=None,
        teacher=ScriptedExpert(),
        recipe=SFT(rejection_sampling=False),
        max_turns=40,
        concurrency=8,
        progress=progress,
    )
    tasks = [("train", DEMO_START + i) for i in indices]
    return engine.collect(tasks, iteration=0).trajectories


def train_tokenizer(demos: Sequence[Trajectory], spec: WarmStartSpec) -> Any:
    """BPE on the rendered demos (the task text compresses well; nothing is downloaded)."""
    from unipost.models import build_tokenizer
    from unipost.rendering.chat import ChatRenderer

    plain = build_tokenizer(vocab_size=256 + 16)  # only to render text with the chat template
    renderer = ChatRenderer(plain, None)
    corpus = [
        renderer.render_text(t.messages(), add_generation_prompt=False) for t in demos[: spec.tokenizer_demos]
    ]
    return build_tokenizer(corpus, vocab_size=spec.tokenizer_vocab)


def _save(model: torch.nn.Module, tokenizer: Any, out: Path, dtype: str) -> None:
    import copy

    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def build_warm_start(
    out_dir: str | Path, spec: WarmStartSpec = WarmStartSpec(), *, progress: bool = True
) -> dict[str, Any]:
    """Build tokenizer, student and teacher into ``out_dir`` (written atomically); returns the manifest."""
    from rich.progress import Progress

    from unipost.models import build_tiny_qwen3
    from unipost.objective import SFT
    from unipost.rendering.chat import ChatRenderer
    from unipost.train.optimise import lr_factor, make_microbatches, optimise_epoch

    if not 0 < spec.student_epochs <= spec.teacher_epochs:
        raise ValueError(f"need 0 < student_epochs <= teacher_epochs, got {spec}")
    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    torch.manual_seed(spec.seed)
    log = (lambda *a: print(*a, flush=True)) if progress else (lambda *a: None)
    demos = expert_demos(spec, progress=progress)
    log(f"{len(demos)} expert demos in {time.perf_counter() - started:.0f} s")
    tokenizer = train_tokenizer(demos, spec)
    renderer = ChatRenderer(tokenizer, None)
    model = build_tiny_qwen3(
        len(tokenizer),
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        seed=spec.seed,
    )
    recipe = SFT(rejection_sampling=False)
    batches = make_microbatches(demos, recipe, renderer, max_tokens=spec.micro_batch_tokens)
    tokens = sum(b.packed.num_tokens for b in batches)
    docs_per_batch = len(demos) / max(len(batches), 1)
    accumulation = max(1, round(spec.docs_per_step / docs_per_batch))
    steps_per_epoch = math.ceil(len(batches) / accumulation)
    total_steps = math.ceil(spec.teacher_epochs * steps_per_epoch)
    warmup = max(1, round(spec.warmup_ratio * total_steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.95))
    params = sum(p.numel() for p in model.parameters())
    log(
        f"vocab {len(tokenizer)}, {params / 1e6:.2f}M parameters, {tokens / len(demos):.0f} tokens per demo, "
        f"{len(batches)} micro-batches x {accumulation} per step, {total_steps} steps"
    )
    student_step = math.ceil(spec.student_epochs * steps_per_epoch)
    curve: list[dict[str, float]] = []
    step = 0
    snapshots: dict[str, int] = {}
    generator = torch.Generator().manual_seed(spec.seed)
    train_start = time.perf_counter()
    with Progress(disable=not progress) as bar:
        task = bar.add_task("behaviour cloning", total=total_steps)

        def on_step(metrics: dict[str, float]) -> None:
            nonlocal step
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = spec.lr * lr_factor(
                    step, total_steps, schedule="cosine", warmup_steps=warmup, min_lr_ratio=spec.min_lr_ratio
                )
            if step % 10 == 0 or step == total_steps:
                curve.append({"step": step, "loss": float(metrics.get("loss", float("nan")))})
            bar.update(task, advance=1, description=f"behaviour cloning (loss {metrics.get('loss', 0):.3f})")
            if progress and not sys.stdout.isatty() and step % 50 == 0:  # a log file gets plain lines
                rate = tokens / steps_per_epoch * step / (time.perf_counter() - train_start)
                log(f"step {step}/{total_steps} loss {metrics.get('loss', 0):.3f} {rate:.0f} tokens/s")
            if step == student_step:
                _save(model, tokenizer, tmp / "student", spec.save_dtype)
                snapshots["student"] = step
            if step >= total_steps:
                raise _BudgetReachedError

        for group in optimizer.param_groups:
            group["lr"] = spec.lr * lr_factor(0, total_steps, schedule="cosine", warmup_steps=warmup)
        try:
            while True:
                optimise_epoch(
                    model,
                    batches,
                    recipe,
                    optimizer,
                    generator=generator,
                    grad_accumulation=accumulation,
                    grad_clip=1.0,
                    on_step=on_step,
                )
        except _BudgetReachedError:
            pass
    train_seconds = time.perf_counter() - train_start
    _save(model, tokenizer, tmp / "teacher", spec.save_dtype)
    snapshots["teacher"] = step
    rate = tokens * step / steps_per_epoch / train_seconds
    log(f"trained {step} steps in {train_seconds / 60:.1f} min ({rate:.0f} tokens/s)")
    manifest: dict[str, Any] = {
        "spec": asdict(spec),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "snapshots_at_step": snapshots,
        "steps_per_epoch": steps_per_epoch,
        "parameters": params,
        "vocab": len(tokenizer),
        "tokens_per_demo": tokens / len(demos),
        "train_minutes": train_seconds / 60,
        "total_minutes": (time.perf_counter() - started) / 60,
        "load_average_1m_at_end": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "curve": curve,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
    }
    if spec.validation_tasks:
        manifest["validation"] = validate(tmp / "student", spec, progress=progress)
    manifest["sha256"] = _hashes(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


class _BudgetReachedError(Exception):
    """Raised from the step callback when the step budget ends mid-epoch."""


def validate(model_dir: str | Path, spec: WarmStartSpec, *, progress: bool = False) -> dict[str, float]:
    """Greedy episodes of a built model on validation tasks (train split, never the held-out split)."""
    from unipost.envs.registry import embedded_env_factory
    from unipost.eval.evaluate import evaluate_policy
    from unipost.rollout.transformers_policy import TransformersPolicy

    model, tokenizer = load_model(model_dir)
    policy = TransformersPolicy(model, tokenizer, max_new_tokens=MAX_NEW_TOKENS)
    tasks = [("train", VALIDATION_START + i) for i in range(spec.validation_tasks)]
    with torch.no_grad():
        result = evaluate_policy(
            embedded_env_factory(spec.difficulty, spec.max_observation_chars, prompt_tools=False),
            policy,
            tasks,
            max_turns=MAX_TURNS,
            concurrency=min(32, len(tasks)),
            progress=progress,
        )
    if progress:
        print(result.summary("validation"), flush=True)
    return {k: v for k, v in result.to_dict().items() if isinstance(v, int | float)}


def load_model(model_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """A built student or teacher and its tokenizer (the tool template is saved with it)."""
    from transformers import AutoModelForCausalLM

    from unipost.models.pretrained import load_pretrained_tokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), attn_implementation="sdpa", dtype=torch.float32
    )
    return model.eval(), load_pretrained_tokenizer(model_dir)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def load_manifest(root: str | Path = ASSETS) -> dict[str, Any]:
    """The manifest of a built warm start, after checking every file against its recorded hash."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no warm start at {root} (missing {MANIFEST}); "
            "build one with: python scripts/build-warm-start.py"
        )
    manifest = json.loads(path.read_text())
    actual = _hashes(root)
    if actual != manifest.get("sha256"):
        changed = sorted(set(actual.items()) ^ set(manifest.get("sha256", {}).items()))
        raise ValueError(
            f"the warm start at {root} does not match its manifest ({len(changed)} differing entries, e.g. "
            f"{changed[0][0]!r}); rebuild it with: python scripts/build-warm-start.py"
        )
    return manifest


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
