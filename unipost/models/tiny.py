"""Tiny Qwen3-architecture students and locally trained tokenizers.

Tests, demos and CPU experiments must never download weights or tokenizers, so a student is a
random-init (or locally trained) ``Qwen3ForCausalLM`` built from a config, with a byte-level BPE
tokenizer trained here on a small corpus and carrying a real chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]


def load_template(name: str = "chatml_tools") -> str:
    """A chat template by name: unipost's own (``chatml_tools``) or a file path."""
    path = Path(name)
    if path.suffix == ".jinja" and path.exists():
        return path.read_text()
    return resources.files("unipost.models.templates").joinpath(f"{name}.jinja").read_text()


chat_template = load_template


def _default_corpus() -> list[str]:
    """Deterministic text for a given unipost version: its own source and templates."""
    root = Path(__file__).resolve().parents[1]
    texts = [p.read_text() for p in sorted(root.rglob("*.py"))]
    texts += [p.read_text() for p in sorted(root.rglob("*.jinja"))]
    texts += [p.read_text() for p in sorted(root.rglob("*.json"))]
    return texts


def build_tokenizer(
    corpus: Iterable[str] | None = None,
    vocab_size: int = 2048,
    template: str = "chatml_tools",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally and attach a chat template.

    Byte-level BPE can encode any string, so tool outputs never produce unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else _default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = load_template(template)
    return fast


def build_tiny_qwen3(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 8192,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> Qwen3ForCausalLM:
    """A random-init Qwen3 model (same code path as Qwen3-4B/8B, just small)."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model
