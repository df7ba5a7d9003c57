"""A local white-box policy on a transformers causal LM: batched sampling with log-probs, and scoring.

``act`` renders every state through the tokenizer's own chat template (with the tool schemas),
left-pads the batch, and runs ``model.generate`` with its KV cache until the end-of-turn token.
``score`` returns the per-token log-probs of given actions (OPD's teacher log-probs, importance
ratios), with one padded forward pass per micro-batch.

Which log-probs ``act`` returns (``logprobs=``):

- ``"raw"`` (default): ``log_softmax(logits / temperature)`` at each sampled token, *before* top-p
  truncation. This is the policy's own distribution, what the trainer's forward pass computes (at
  temperature 1 exactly ``log pi_theta``), so it is the right ``log pi_old`` for importance ratios and
  for OPD's ``log pi_T - log pi_theta``.
- ``"sampling"``: the log-prob under the distribution the token was actually drawn from, after
  temperature *and* top-p renormalisation (the proposal density of the sample).

Both are recorded by logits processors while generating, one (batch, vocab) tensor at a time, rather
than through ``output_scores``/``output_logits``, which keep a (steps, batch, vocab) tensor: 40 GB for a
32 x 2048-token batch of a 150k-vocabulary model. We therefore apply temperature and top-p with our own
processors (and pin transformers' ones off), so the order raw -> temperature -> top-p -> record is ours.

KV reuse across an episode's turns (``prefix_cache_mb``, on by default): turn t+1's prompt is turn t's
prompt + the action + the observation, so after each ``generate`` the policy keeps every row's keys and
values (prompt + generated tokens) in a :class:`PrefixKVCache`. A later prompt looks up the entry with
the longest common *token* prefix (checked token by token, so an edited history, a template that
re-renders earlier turns differently, or a different tokenisation at the boundary just shortens the
reused part; no match means a full encode) and only its new suffix is encoded. Entries are dropped
when the model's weights change (a training step between rollouts), so a stale cache is never read.

Decoding (``decode="compact"``, the default) is our own loop over the model's forward with the inputs
``model.generate`` gives it (the same prompt, attention mask, cache and positions, the same processors
in the same order, one multinomial over the whole batch per step), except that a row which has emitted
the end-of-turn token leaves the batch: its keys/values are taken out of the cache then, and later steps
compute only the rows still generating (``generate`` decodes every row until the last one stops, so a
batch whose longest turn hits ``max_new_tokens`` paid for every row at every step). Row results do not
depend on which other rows share the batch, so tokens, log-probs and cached keys/values are those of
``decode="generate"`` (``model.generate`` itself), bitwise (tested); sampled rows see the same random
draws, because the multinomial still runs over all rows (finished ones with a dummy distribution).
On CPU, generation runs with ``cpu_threads`` intra-op threads (1 by default): decode steps are many
small ops, where a second OpenMP thread barely helps on an idle machine and, on a loaded one, waiting
for a descheduled thread made steps 5-20x slower (measured in benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from unipost.data import Message
from unipost.rendering.toolcalls import (
    ToolCallStyle,
)
from unipost.rollout.chat_policy import ChatPolicyBase
from unipost.rollout.policy import AgentState, PolicyOutput
from unipost.rollout.sampling import LogprobKind, SamplingConfig


class _LogprobRecorder(LogitsProcessor):
    """Records log p(sampled token) for every row and step, holding one (B, V) tensor at a time.

    At step s the processor sees the scores for token s and ``input_ids`` ending with token s-1, so it
    gathers the previous step's log-probs at that token; ``finish`` gathers the last step's.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.prev_BV: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # per step: (B,)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._gather(input_ids[:, -1])
        self.prev_BV = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _gather(self, chosen_B: torch.Tensor) -> None:
        if self.prev_BV is not None:
            self.steps.append(self.prev_BV.gather(1, chosen_B[:, None].to(self.prev_BV.device))[:, 0])

    def finish(self, last_B: torch.Tensor) -> torch.Tensor:
        """(B, S) log-probs of the S generated tokens."""
        self._gather(last_B)
        self.prev_BV = None
        return torch.stack(self.steps, dim=1).cpu()


@dataclass
class _PrefixEntry:
    tokens: torch.Tensor  # (n,) int64 on CPU
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (kv_heads, n, head_dim)
    nbytes: int


class PrefixKVCache:
    """An LRU of (token sequence -> per-layer keys/values) for one model, bounded in bytes.

    ``match`` finds the entry sharing the longest token prefix with a prompt (compared token by token,
    never assumed); ``add`` stores a sequence's keys/values and drops entries it covers (an episode's
    previous turn) and, least recently used first, whatever exceeds ``max_bytes``.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, _PrefixEntry] = OrderedDict()
        self.nbytes = 0
        self._next_key = 0

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def match(self, prompt: torch.Tensor) -> tuple[int | None, int]:
        """(entry key, length of the longest common prefix with ``prompt``); (None, 0) without any."""
        best_key, best = None, 0
        for key, entry in self.entries.items():
            n = min(len(entry.tokens), len(prompt))
            if n <= best:
                continue
            differ = (entry.tokens[:n] != prompt[:n]).nonzero()
            common = int(differ[0]) if len(differ) else n
            if common > best:
                best_key, best = key, common
        if best_key is not None:
            self.entries.move_to_end(best_key)
        return best_key, best

    def add(self, tokens: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for key in [k for k, e in self.entries.items() if _covers(tokens, e.tokens)]:
            self._drop(key)
        self._store(tokens, kv)

    def discard(self, entries: Sequence[_PrefixEntry]) -> None:
        """Drop these entries (by identity) if still held: turns that a later entry has replaced."""
        for key in [k for k, e in self.entries.items() if any(e is x for x in entries)]:
            self._drop(key)

    def _store(self, tokens: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        self.entries[self._next_key] = _PrefixEntry(tokens, kv, nbytes)
        self._next_key += 1
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes


def _covers(tokens: torch.Tensor, prefix: torch.Tensor) -> bool:
    return len(prefix) <= len(tokens) and bool(torch.equal(tokens[: len(prefix)], prefix))


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a transformers ``DynamicCache``, each (batch, kv_heads, length, dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


_THREADS_LOCK = threading.Lock()
_THREADS_STATE: dict[str, Any] = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside, restored by the last of nested/concurrent users
    (a teacher generating in a worker thread while the student generates in the main one)."""
    if n is None:
        yield
        return
    with _THREADS_LOCK:
        if _THREADS_STATE["depth"] == 0:
            _THREADS_STATE["saved"] = torch.get_num_threads()
        _THREADS_STATE["depth"] += 1
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_STATE["depth"] -= 1
            saved = _THREADS_STATE["saved"]
            if _THREADS_STATE["depth"] == 0 and saved is not None and torch.get_num_threads() != saved:
                torch.set_num_threads(saved)


class TransformersPolicy(ChatPolicyBase):
    """A local causal LM (any transformers model with a chat template) as a batched policy.

    Args:
        model: a causal LM (``Qwen3ForCausalLM`` ...); put it on its device and dtype beforehand.
        tokenizer: its tokenizer, carrying the chat template that defines the model's native format.
        sampling: a :class:`~unipost.rollout.sampling.SamplingConfig` (max_new_tokens, temperature, top_p,
            logprobs), or those four given separately (unset ones take its defaults 512, 1, 1, "raw"),
            not both. ``greedy=True`` ignores temperature and top_p for the choice of token.
        style: tool-call format; None reads it off the chat template (``detect_style``).
        name: the policy's name in trajectories and logs.
        context_budget: a prompt longer than this many tokens is not generated from; its output carries
            ``tool_error="context_overflow"`` (paper Table 4's failure mode) instead of raising.
        logprobs: "raw" or "sampling", see the module docstring.
        seed / generator: make sampling reproducible. A seed is drawn from the generator per ``act``
            call; sampling runs under ``torch.random.fork_rng`` so the global RNG is left untouched.
            Note: a row's sample depends on the batch it was drawn in.
        max_calls, require_call: passed to ``parse_assistant`` (one call per turn, as OpenHands).
        score_batch_size: sequences per forward pass in ``score``.
        end_of_turn: the token that ends an assistant turn (generation stops there).
        prefix_cache_mb: memory for keys/values kept between ``act`` calls so a turn encodes only what
            is new since an earlier prompt (see the module docstring); 0 turns KV reuse off. Models with
            sliding-window layers never reuse.
        decode: ``"compact"`` (default) decodes with our own loop that drops finished rows from the batch
            (on CPU; other devices use ``model.generate``); ``"generate"`` calls ``model.generate``. Both
            give the same tokens, log-probs and cache (see the module docstring); the second is kept as
            the reference.
        cpu_threads: torch intra-op threads while generating on CPU (restored afterwards); None leaves
            torch's setting. Ignored for models on other devices.
    """

    # reuse a cached prefix only if it saves at least this many tokens (else the row is encoded fresh,
    # in the same batch as other fresh rows)
    min_reuse_tokens = 16
    # decode="compact" keeps at least this many rows in a batch (see _decode_compact)
    min_decode_rows = 4

    white_box = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
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
        score_batch_size: int = 8,
        end_of_turn: str = "<|im_end|>",
        prefix_cache_mb: float = 1024.0,
        decode: Literal["compact", "generate"] = "compact",
        cpu_threads: int | None = 1,
    ):
        self.sampling = SamplingConfig.resolve(
            sampling, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=logprobs
        )
        self.model = model
        self._init_chat(
            tokenizer, style=style, name=name, context_budget=context_budget, seed=seed,
            generator=generator, max_calls=max_calls, require_call=require_call, end_of_turn=end_of_turn,
        )  # fmt: skip
        self.score_batch_size = score_batch_size
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.eot_id
        self.prefix_cache = PrefixKVCache(int(prefix_cache_mb * 2**20))
        self.kv_stats = {"prompt_tokens": 0, "reused_tokens": 0, "generate_calls": 0}
        self._weights_key: tuple | None = None
        if decode not in ("compact", "generate"):
            raise ValueError(f"decode must be 'compact' or 'generate', got {decode!r}")
        if cpu_threads is not None and (
            isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1
        ):
            raise ValueError(f"cpu_threads must be a positive integer or None, got {cpu_threads!r}")
        self.decode = decode
        self.cpu_threads = cpu_threads

    def __repr__(self) -> str:
        return (
            f"TransformersPolicy(name={self.name!r}, model={type(self.model).__name__}, "
            f"style={self.style!r}, temperature={self.temperature}, top_p={self.top_p}, "
            f"max_new_tokens={self.max_new_tokens})"
        )

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids_BL = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids_BL[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask_BL[i, width - len(r) :] = 1
        return ids_BL.to(self.device), mask_BL.to(self.device)

    def _draw_seed(self, seed: int | None) -> int | None:
        if seed is not None:
            return seed
        if self.generator is not None:
            return int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return None

    # -- act ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def act(
        self, states: list[AgentState], *, greedy: bool = False, seed: int | None = None
    ) -> list[PolicyOutput]:
        """One assistant turn per state, generated as one left-padded batch.

        With KV reuse on, rows whose prompt extends a cached sequence form one batch that encodes only
        the new suffixes, and the other rows a second batch encoded in full.
        """
        outputs, batch = self.prompts_within_budget(states)
        if not batch:
            return outputs  # type: ignore[return-value]
        seed = self._draw_seed(seed)
        reuse = self._reuse_enabled()
        groups: list[list[tuple[int, list[int], _PrefixEntry | None, int]]] = [[], []]
        for i, ids in batch:
            entry, usable = self._match(ids) if reuse else (None, 0)
            groups[entry is not None].append((i, ids, entry, usable))
            self.kv_stats["prompt_tokens"] += len(ids)
        for group in groups:
            if not group:
                continue
            tokens, logps = self._generate(
                [ids for _, ids, _, _ in group],
                greedy=greedy,
                seed=seed,
                prefixes=[(entry, usable) for _, _, entry, usable in group] if reuse else None,
            )
            for (i, _, _, _), toks, lps in zip(group, tokens, logps, strict=True):
                outputs[i] = self._to_output(states[i], toks, lps)
        return outputs  # type: ignore[return-value]

    # -- KV reuse -----------------------------------------------------------------------------------

    def _reuse_enabled(self) -> bool:
        """KV reuse is on, the model has only full-attention layers, and cached entries are still valid."""
        layer_types = getattr(getattr(self.model, "config", None), "layer_types", None) or []
        if self.prefix_cache.max_bytes <= 0 or any(t != "full_attention" for t in layer_types):
            return False
        key = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if key != self._weights_key:  # an optimizer step (in place) or new weights: old K/V are stale
            self.prefix_cache.clear()
            self._weights_key = key
        return True

    def _match(self, ids: list[int]) -> tuple[_PrefixEntry | None, int]:
        key, common = self.prefix_cache.match(torch.tensor(ids, dtype=torch.long))
        usable = min(common, len(ids) - 1)  # the last prompt token must be fed: it yields the next logits
        if key is None or usable < self.min_reuse_tokens:
            return None, 0
        return self.prefix_cache.entries[key], usable

    def _prefilled_cache(
        self, prompts: list[list[int]], prefixes: list[tuple[_PrefixEntry | None, int]], width: int
    ) -> tuple[DynamicCache, int]:
        """A left-padded batch cache holding each row's reusable keys/values, and its length.

        Rows are left-padded to ``width``; the part to encode is as wide as the longest new suffix, so a
        row with a shorter suffix re-encodes a few of its cached tokens (its cache is cut to fit).
        """
        suffix = max(len(ids) - usable for ids, (_, usable) in zip(prompts, prefixes, strict=True))
        length = width - suffix
        template = next(e for e, _ in prefixes if e is not None).kv
        layers = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros((len(prompts), k0.shape[0], length, k0.shape[2]))
            values = v0.new_zeros((len(prompts), v0.shape[0], length, v0.shape[2]))
            for row, (ids, (entry, _)) in enumerate(zip(prompts, prefixes, strict=True)):
                keep = length - (width - len(ids))  # cached tokens of this row inside the cache region
                if entry is not None and keep > 0:
                    keys[row, :, length - keep :] = entry.kv[layer][0][:, :keep]
                    values[row, :, length - keep :] = entry.kv[layer][1][:, :keep]
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers), length

    @staticmethod
    def _row_kv(
        layers: list[tuple[torch.Tensor, torch.Tensor]], row: int, start: int, n: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Copies of one batch row's keys/values at cache positions [start, start + n), or None."""
        if n <= 0 or start + n > layers[0][0].shape[2]:
            return None
        span = slice(start, start + n)
        return [(k[row, :, span].clone(), v[row, :, span].clone()) for k, v in layers]

    def _remember(
        self,
        prompts: list[list[int]],
        tokens: list[list[int]],
        kv_rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None],
        prefixes: list[tuple[_PrefixEntry | None, int]],
    ) -> None:
        """Keep each row's keys/values of prompt + generated tokens (the last token was never fed), in
        row order.

        The entries these rows continued from are then dropped: each row's new entry holds all of the
        old one that its episode can still use (an action that was not executed as generated, e.g.
        re-rendered from its parsed tool call, is not in the next prompt).
        """
        for ids, toks, kv in zip(prompts, tokens, kv_rows, strict=True):
            if kv is not None:
                self.prefix_cache.add(torch.tensor(ids + toks[:-1], dtype=torch.long), kv)
        self.prefix_cache.discard([entry for entry, _ in prefixes if entry is not None])

    @staticmethod
    def _cache_kwarg() -> str:
        """Recent transformers call generate's cache argument ``cache``; earlier ones ``past_key_values``."""
        try:
            from transformers.generation.utils import ALL_CACHE_NAMES
        except ImportError:
            return "past_key_values"
        return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"

    # -- generate -----------------------------------------------------------------------------------

    def _generate(
        self,
        prompts: list[list[int]],
        *,
        greedy: bool,
        seed: int | None,
        prefixes: list[tuple[_PrefixEntry | None, int]] | None = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        ids_BL, mask_BL = self._left_pad(prompts)
        width = ids_BL.shape[1]
        self.kv_stats["generate_calls"] += 1
        cache = None
        if prefixes is not None and any(entry is not None for entry, _ in prefixes):
            cache, reused = self._prefilled_cache(prompts, prefixes, width)
            self.kv_stats["reused_tokens"] += int(mask_BL[:, :reused].sum())
        device = self.device
        threads = self.cpu_threads if device.type == "cpu" else None
        # compact decoding is checked bitwise against generate on CPU only (other devices' matmul kernels
        # may depend on the batch size differently), so elsewhere generate runs
        compact = self.decode == "compact" and device.type == "cpu"
        run = self._decode_compact if compact else self._decode_generate
        with _intra_op_threads(threads), contextlib.ExitStack() as stack:
            if seed is not None and not greedy:
                cuda = [device.index or 0] if device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=cuda))
                torch.manual_seed(seed)
            tokens, logps, kv_rows = run(ids_BL, mask_BL, cache, greedy=greedy, keep_kv=prefixes is not None)
        if prefixes is not None:
            self._remember(prompts, tokens, kv_rows, prefixes)
        return tokens, logps

    def _decode_generate(
        self, ids_BL: torch.Tensor, mask_BL: torch.Tensor, cache: Any, *, greedy: bool, keep_kv: bool
    ) -> tuple[list[list[int]], list[list[float]], list[Any]]:
        """``model.generate`` (the reference decoder): tokens, log-probs and each row's keys/values."""
        width = ids_BL.shape[1]
        raw = _LogprobRecorder(self.temperature)
        sampled = _LogprobRecorder(1.0)
        processors = [raw, TemperatureLogitsWarper(self.temperature)]
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        processors.append(sampled)
        kwargs = dict(
            attention_mask=mask_BL,
            max_new_tokens=self.max_new_tokens,
            do_sample=not greedy,
            repetition_penalty=1.0,
            eos_token_id=self.eot_id,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList(processors),
            use_cache=True,
            return_dict_in_generate=True,
        )
        if cache is not None:
            kwargs[self._cache_kwarg()] = cache
        if not greedy:
            # pinned so that the model's generation_config (Qwen3: temperature 0.6, top_k 20) cannot add
            # warpers after our recorders; ours above implement temperature and top-p
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        out = self.model.generate(ids_BL, **kwargs)
        new_BS = out.sequences[:, width:].cpu()
        recorder = raw if self.logprobs == "raw" else sampled
        other = sampled if recorder is raw else raw
        logp_BS = recorder.finish(new_BS[:, -1])
        other.prev_BV = None
        tokens, logps = [], []
        for row, lp in zip(new_BS.tolist(), logp_BS.tolist(), strict=True):
            n = row.index(self.eot_id) + 1 if self.eot_id in row else len(row)
            tokens.append(row[:n])
            logps.append(lp[:n])
        kv_rows: list[Any] = [None] * len(tokens)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        if keep_kv and cache is not None:
            layers = _cache_layers(cache)
            lengths = mask_BL.shape[1] - mask_BL.sum(1)  # left padding per row
            for row, toks in enumerate(tokens):
                start = int(lengths[row])
                kv_rows[row] = self._row_kv(layers, row, start, width - start + len(toks) - 1)
        return tokens, logps, kv_rows

    def _decode_compact(
        self, ids_BL: torch.Tensor, mask_BL: torch.Tensor, cache: Any, *, greedy: bool, keep_kv: bool
    ) -> tuple[list[list[int]], list[list[float]], list[Any]]:
        """``model.generate``'s sampling loop with finished rows dropped from the batch (module docstring).

        Per step, exactly what ``generate`` computes for a row: the model's forward on the same inputs
        (ids, attention mask, position ids counting the real tokens, ``logits_to_keep=1``), logits in
        float32, our processors (raw log-probs, temperature, top-p, sampled log-probs), then the argmax,
        or a multinomial over all rows of the batch (rows already finished get a uniform dummy
        distribution; each row's draw depends only on its own row, so live rows get generate's draws).
        """
        batch, width = ids_BL.shape
        cache_kwarg = self._cache_kwarg()

        def forward(
            input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
        ) -> tuple[Any, torch.Tensor]:
            kwargs = {cache_kwarg: cache} if cache is not None else {}
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=mask,
                logits_to_keep=1,
                use_cache=True,
                return_dict=True,
                **kwargs,
            )
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = out.past_key_values
            return cache, out.logits[:, -1].to(copy=True, dtype=torch.float32)

        # generate's positions: count of real tokens before each one (0 on left padding)
        position_BL = (mask_BL.long().cumsum(-1) - 1).masked_fill(mask_BL == 0, 0)
        past = cache.get_seq_length() if cache is not None else 0
        cache, logits = forward(ids_BL[:, past:], mask_BL, position_BL[:, past:].clone(), cache)
        position_B1 = position_BL[:, -1:]
        top_p = TopPLogitsWarper(self.top_p) if self.top_p < 1.0 else None
        pad_B = (mask_BL.shape[1] - mask_BL.sum(1)).tolist()
        # the batch never shrinks below min_decode_rows: matrix products of fewer rows take other kernels
        # (on this CPU, 1-3 rows give other bits than >= 4), so finished rows stay in as fillers
        floor = min(batch, self.min_decode_rows)
        rows = list(range(batch))  # the original row at each batch position
        alive = [True] * batch  # per batch position: still generating (else a finished filler)
        mask = mask_BL
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logps: list[list[float]] = [[] for _ in range(batch)]
        kv_rows: list[Any] = [None] * batch
        for step in range(self.max_new_tokens):
            raw_BV = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            scores = logits / self.temperature
            if top_p is not None:
                scores = top_p(None, scores)  # type: ignore[arg-type]
            if greedy:
                next_B = torch.argmax(scores, dim=-1)
            elif len(rows) == batch and all(alive):
                next_B = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:  # one draw per original row, as generate makes (a row's draw depends on its row only)
                full = scores.new_full((batch, scores.shape[1]), 1.0 / scores.shape[1])
                at = torch.tensor(rows, device=scores.device)
                full[at] = torch.softmax(scores, dim=-1)
                next_B = torch.multinomial(full, num_samples=1).squeeze(1)[at]
            chosen = raw_BV if self.logprobs == "raw" else torch.log_softmax(scores.float() / 1.0, dim=-1)
            logp_B = chosen.gather(1, next_B[:, None])[:, 0]
            last = step == self.max_new_tokens - 1
            done = []
            for j, (tok, lp) in enumerate(zip(next_B.tolist(), logp_B.tolist(), strict=True)):
                if alive[j]:
                    tokens[rows[j]].append(tok)
                    logps[rows[j]].append(lp)
                    if last or tok == self.eot_id:
                        done.append(j)
            if done and keep_kv:  # the cache holds prompt + tokens before this step's (never fed)
                layers = _cache_layers(cache)
                for j in done:
                    row = rows[j]
                    kv_rows[row] = self._row_kv(layers, j, pad_B[row], width - pad_B[row] + step)
            for j in done:
                alive[j] = False
            if last or not any(alive):
                break
            next_B = torch.where(torch.tensor(alive, device=next_B.device), next_B, self.pad_id)
            keep = [j for j in range(len(rows)) if alive[j]]
            keep += [j for j in range(len(rows)) if not alive[j]][: max(0, floor - len(keep))]
            if len(keep) < len(rows):
                keep.sort()
                keep_t = torch.tensor(keep, device=next_B.device)
                cache.batch_select_indices(keep_t)
                mask, next_B, position_B1 = mask[keep_t], next_B[keep_t], position_B1[keep_t]
                rows, alive = [rows[j] for j in keep], [alive[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            position_B1 = position_B1 + 1
            cache, logits = forward(next_B[:, None], mask, position_B1, cache)
        return tokens, logps, kv_rows

    # -- score --------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(
        self,
        states: list[AgentState],
        actions: list[Message],
        *,
        action_token_ids: list[list[int]] | None = None,
        temperature: float = 1.0,
    ) -> list[torch.Tensor]:
        """log pi(a_j | s, a_<j) for every token of each action: a list of float32 (n_tokens,) CPU tensors.

        The action's tokens are what the chat template renders after the generation prompt, up to and
        including the end-of-turn token (``render_action``); pass ``action_token_ids`` to score exact
        sampled tokens instead (OPD: the teacher scores the student's tokens, same tokenizer).
        """
        pairs = self.scoring_pairs(states, actions, action_token_ids)
        out: list[torch.Tensor] = []
        for start in range(0, len(pairs), self.score_batch_size):
            out.extend(self._score_batch(pairs[start : start + self.score_batch_size], temperature))
        return out

    def _score_batch(
        self, pairs: list[tuple[list[int], list[int]]], temperature: float
    ) -> list[torch.Tensor]:
        # left padding puts every action at the end, so logits_to_keep = longest action + 1 suffices
        ids_BL, mask_BL = self._left_pad([p + a for p, a in pairs])
        position_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(a) for _, a in pairs) + 1
        logits_BKV = self.model(
            input_ids=ids_BL,
            attention_mask=mask_BL,
            position_ids=position_BL,
            logits_to_keep=keep,
            use_cache=False,
        ).logits
        out = []
        for i, (_, action) in enumerate(pairs):
            n = len(action)
            logits_NV = logits_BKV[i, keep - n - 1 : keep - 1].float() / temperature
            target_N = torch.tensor(action, device=logits_NV.device)
            out.append(torch.log_softmax(logits_NV, -1).gather(1, target_N[:, None])[:, 0].cpu())
        return out
