"""Training data: JSONL records, their keys for sharding, and token ids with loss labels.

A data file holds one JSON object per line (blank lines are skipped), either
``{"text": "..."}`` (plain text, loss on every token) or ``{"messages": [{"role",
"content"}, ...]}`` in OpenAI's chat format (rendered with the model's chat template, loss
on the assistant turns only, so the model learns to answer, not to ask). ``read_records``
checks every line and names the first bad one; ``encode`` turns a record into an
``Example`` of token ids and labels, ``-100`` (PyTorch's ``ignore_index``) where there is no
loss. Labels are aligned with ``input_ids`` (Hugging Face's convention): the logits at
position ``i - 1`` predict ``labels[i]``; the shift happens in the loss, not here.

This module knows nothing of the swarm: the fine-tuning and data-parallel trainers use it,
and ``train.sharding`` splits records by ``record_key``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerchain.errors import ConfigError

IGNORE_INDEX = -100  # a label with no loss (torch.nn.functional.cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 256  # tokens an example keeps (the rest is cut off)


@dataclass(frozen=True)
class Example:
    """One training example: token ids and their labels (same length, ``IGNORE_INDEX``
    where no loss is taken: the prompt, non-assistant turns)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels differ in length")

    @property
    def loss_tokens(self) -> int:
        """Positions that carry a loss (the first token never does: nothing predicts it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file, each checked (``check_record``); ConfigError naming the
    file and line of the first bad one, or saying the file is missing or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read the training data {path}: {error}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ConfigError(f"{path}:{number}: not JSON ({error})") from None
        problem = check_record(record)
        if problem:
            raise ConfigError(
                f"{path}:{number}: {problem}",
                hint='each line is {"text": ...} or {"messages": [{"role", "content"}, ...]}',
            )
        records.append(record)
    if not records:
        raise ConfigError(f"the training data {path} holds no records")
    return records


def check_record(record: object) -> str | None:
    """What is wrong with a record, or None if it is a valid text or chat record."""
    if not isinstance(record, dict):
        return "a record must be a JSON object"
    if ("text" in record) == ("messages" in record):
        return 'a record needs exactly one of "text" and "messages"'
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            return '"text" must be a non-empty string'
        return None
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list'
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} must be an object"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; use one of {ROLES}"
        if not isinstance(message.get("content"), str):
            return f"message {i} needs a string 'content'"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return "a chat record needs a non-empty assistant message (the loss is taken there)"
    return None


def record_key(record: Mapping[str, Any]) -> str:
    """A stable text of a record: the same record gives the same key in every process
    (``train.sharding``'s hash strategy hashes it)."""
    if "text" in record:
        return str(record["text"])
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def encode(record: Mapping[str, Any], tokenizer: Any, max_tokens: int = DEFAULT_MAX_TOKENS
           ) -> Example:
    """A record as token ids and labels, at most ``max_tokens`` of them (the start is kept).

    ``"text"``: the tokenizer's ids (with its own special tokens), loss on every token.
    ``"messages"``: the chat template's rendering, encoded piece by piece so each assistant
    turn's ids are exactly what generation would produce after the template's generation
    prompt; loss on those (the turn's closing tokens included, so the model learns to stop).
    A tokenizer without a chat template joins the contents with newlines, with the same
    labels. ConfigError if the record is invalid or no loss token survives the cut.
    """
    problem = check_record(record)
    if problem:
        raise ConfigError(f"bad training record: {problem}")
    if max_tokens < 2:
        raise ConfigError(f"max_tokens must be at least 2, got {max_tokens}")
    if "text" in record:
        ids = [int(i) for i in tokenizer.encode(record["text"], add_special_tokens=True)]
        pieces = [(ids, True)]
    else:
        pieces = [
            ([int(i) for i in tokenizer.encode(text, add_special_tokens=False)], loss)
            for text, loss in _chat_pieces(record["messages"], tokenizer)
            if text
        ]
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, loss in pieces:
        input_ids.extend(ids)
        labels.extend(ids if loss else [IGNORE_INDEX] * len(ids))
    example = Example(tuple(input_ids[:max_tokens]), tuple(labels[:max_tokens]))
    if example.loss_tokens == 0:
        raise ConfigError(
            f"a training record has no loss token within its first {max_tokens} tokens",
            hint="shorten its prompt or raise the token limit",
        )
    return example


def _chat_pieces(messages: Sequence[Mapping[str, str]], tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered chat as consecutive (text, loss?) pieces whose concatenation is the
    template's rendering of the whole conversation.

    A template renders prefixes of a conversation as prefixes of its text (ChatML, Llama's,
    Gemma's do); an assistant turn's text is what ``messages[:i+1]`` adds to ``messages[:i]``
    rendered with the generation prompt. A template that breaks this is a ConfigError.
    """
    chat = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not getattr(tokenizer, "chat_template", None):
        pieces = []
        for i, m in enumerate(chat):
            sep = "\n" if i < len(chat) - 1 else ""
            pieces.append((m["content"] + sep, m["role"] == "assistant"))
        return pieces

    def render(upto: int, prompt: bool) -> str:
        if upto == 0:
            return ""
        text: str = tokenizer.apply_chat_template(
            chat[:upto], tokenize=False, add_generation_prompt=prompt
        )
        return text

    pieces = []
    done = ""  # the text covered by the pieces so far
    for i, m in enumerate(chat):
        before = render(i, prompt=m["role"] == "assistant")
        after = render(i + 1, prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise ConfigError(
                "the model's chat template does not render a conversation's prefixes as "
                "prefixes of its text; use {\"text\": ...} records for this model"
            )
        pieces.append((before[len(done):], False))
        pieces.append((after[len(before):], m["role"] == "assistant"))
        done = after
    return pieces
