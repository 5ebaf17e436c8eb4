"""Tokenizers and prompts: the tokenizer of a model, and a prompt as token ids.

The tokenizer comes from the GGUF file (built by transformers' GGUF tokenizer converter, from
the vocabulary and merges in the metadata; about 0.7 s) or from the model or shard directory
(``tokenizer.json`` & co). Either way it is a transformers fast tokenizer with the model's chat
template, if it has one. Only the client needs a tokenizer: no token id is sent to a peer
(though the embedding rows the first hop gets name them; see README "What each party sees").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerchain.errors import ConfigError, ModelFileError
from layerchain.model.spec import ModelSpec

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def load_tokenizer(spec: ModelSpec) -> Any:
    """The transformers tokenizer of ``spec`` (with its chat template, if any)."""
    return spec.source.tokenizer()


def tokenizer_from_gguf(path: Path) -> Any:
    """Build the tokenizer stored in a GGUF file's metadata."""
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:  # older transformers: its own (slower) GGUF path
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError) as error:
        raise ModelFileError(f"cannot build the tokenizer of {path}: {error}") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def tokenizer_from_dir(path: Path) -> Any:
    """Load the tokenizer saved in a model or shard directory."""
    from transformers import AutoTokenizer

    if not any(
        (path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")
    ):
        raise ModelFileError(f"{path} has no tokenizer files (tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelFileError(f"cannot load the tokenizer in {path}: {error}") from None


def encode_prompt(tokenizer: Any, prompt: str | Sequence[Message], raw: bool = False) -> list[int]:
    """Token ids of a prompt: a text or a list of chat messages ``{"role", "content"}``.

    Unless ``raw`` (or the tokenizer has no chat template), the prompt goes through the chat
    template with the generation prompt appended; a plain text is one user message. Raw text
    is tokenized as is (with the tokenizer's own BOS, if it adds one); raw messages are their
    contents joined by newlines.
    """
    if isinstance(prompt, str):
        messages: list[Message] = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ConfigError(f"a chat message needs string 'role' and 'content', got {m!r}")
    if not messages or not any(m["content"] for m in messages):
        raise ConfigError("the prompt is empty")
    if raw or not getattr(tokenizer, "chat_template", None):
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages)
        return list(tokenizer.encode(text, add_special_tokens=True))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))
