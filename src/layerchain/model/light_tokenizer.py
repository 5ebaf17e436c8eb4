"""The client's tokenizer without transformers: the same tokenizer, rebuilt from a card.

Building a model's tokenizer through transformers costs a one-shot ``generate`` about 1 s
idle (importing transformers and its model registry, converting the GGUF vocabulary; 2-3 s
under load): more than the rest of the head's load. The first time a model's tokenizer is
built (through transformers, as ever: ``tokenizer.load_tokenizer``) its *card* is written
to ``$LAYERCHAIN_HOME/cache/tokenizers/MODEL_ID.json``: the ``tokenizers`` backend that
transformers built (serialized by the ``tokenizers`` library itself), the chat template and
the special tokens. Later loads rebuild the backend from the card with ``tokenizers`` and
render the chat template with jinja2 in the environment transformers renders it in, so ids,
text and prompts are the same (tests/test_startup.py compares them with transformers').

``LightTokenizer`` offers what the client uses of a tokenizer: ``encode``, ``decode``,
``apply_chat_template(..., tokenize=False)``, ``get_vocab``, ``eos_token_id`` and
``chat_template``. A card is used only when the installed transformers and tokenizers are
the versions that wrote it; a tokenizer that needs more than this (space clean-up on decode,
a template jinja cannot compile here) is not carded and loads through transformers.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerchain.model.spec import ModelSpec
from layerchain.model.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import jinja2
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

CARD_FORMAT = 1  # bump when the card's fields change
DEFAULT_HOME = "~/.layerchain"  # LAYERCHAIN_HOME when unset (as ledger.open)
# a message's reasoning, under the names transformers copies it to (chat_template_utils)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def card_dir() -> Path:
    """Where cards live: ``$LAYERCHAIN_HOME/cache/tokenizers``."""
    home = Path(os.environ.get("LAYERCHAIN_HOME") or DEFAULT_HOME).expanduser()
    return home / "cache" / "tokenizers"


def _versions() -> dict[str, str]:
    """The libraries a card depends on (read from package metadata: nothing is imported)."""
    found = {}
    for name in ("transformers", "tokenizers", "jinja2"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = ""
    return found


class LightTokenizer:
    """A ``tokenizers`` backend, a chat template and special tokens: the subset of a
    transformers fast tokenizer the client calls, computing the same results."""

    def __init__(self, backend: Tokenizer, chat_template: str | None,
                 special_tokens: Mapping[str, str], eos_token_id: int | None) -> None:
        backend.no_truncation()  # transformers encodes without either (its defaults)
        backend.no_padding()
        self._backend = backend
        self.chat_template = chat_template
        self.special_tokens_map = dict(special_tokens)  # {"bos_token": "<|im_start|>", ...}
        self.eos_token_id = eos_token_id
        self._template = None if chat_template is None else _compile(chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        text: str = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token`` (added tokens included), None if the vocabulary lacks it:
        one lookup, where ``get_vocab`` builds a dict of every token (~0.1 s)."""
        found: int | None = self._backend.token_to_id(token)
        return found

    def get_vocab(self) -> dict[str, int]:
        vocab: dict[str, int] = self._backend.get_vocab(with_added_tokens=True)
        return vocab

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """The prompt text of ``messages`` (``tokenize=False`` only: encode it after)."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template")
        if tokenize:
            raise ValueError("LightTokenizer renders text only: encode the result")
        chat = [_alias_reasoning(dict(m)) for m in messages]
        rendered: str = self._template.render(
            messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map,
        )
        return rendered


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """As transformers does before rendering: reasoning under its other names too."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _compile(template: str) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in
    (``chat_template_utils._cached_compile_jinja_template``: sandboxed, trim/lstrip blocks,
    loop controls, its ``tojson``, ``raise_exception`` and ``strftime_now``). Its ``{%
    generation %}`` tag is not here: such a template fails to compile and is not carded."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def card_of(tokenizer: Any) -> dict[str, Any] | None:
    """The card of a transformers fast tokenizer, or None if a LightTokenizer would not
    compute what it computes (see the module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    template = getattr(tokenizer, "chat_template", None)
    special = getattr(tokenizer, "special_tokens_map", {})
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    if template is not None and not isinstance(template, str):
        return None  # several named templates
    if not all(isinstance(v, str) for v in special.values()):
        return None  # additional special tokens as lists
    if template is not None:
        try:
            _compile(template)
        except Exception:  # jinja2's TemplateSyntaxError, an unknown tag: not carded
            return None
    eos = getattr(tokenizer, "eos_token_id", None)
    return {"format": CARD_FORMAT, "versions": _versions(), "backend": backend.to_str(),
            "chat_template": template, "special_tokens": dict(special),
            "eos_token_id": None if eos is None else int(eos)}


def from_card(card: Mapping[str, Any]) -> LightTokenizer:
    from tokenizers import Tokenizer

    return LightTokenizer(Tokenizer.from_str(card["backend"]), card["chat_template"],
                          card["special_tokens"], card["eos_token_id"])


def read_card(spec: ModelSpec) -> dict[str, Any] | None:
    """The stored card of ``spec``'s tokenizer, if there is one written by these versions."""
    path = card_dir() / f"{spec.model_id}.json"
    try:
        card: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if card.get("format") != CARD_FORMAT or card.get("versions") != _versions():
        return None
    return card


def write_card(spec: ModelSpec, card: Mapping[str, Any]) -> None:
    """Store a card (atomically: a concurrent reader sees the old file or the new one);
    a cache that cannot be written is skipped (the next load builds the tokenizer again)."""
    path = card_dir() / f"{spec.model_id}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(card))
        os.replace(tmp, path)
    except OSError as error:
        log.debug("tokenizer card not written to %s: %s", path, error)
        tmp.unlink(missing_ok=True)


def load_client_tokenizer(spec: ModelSpec) -> Any:
    """``spec``'s tokenizer for a client: a LightTokenizer from its card, else the
    transformers tokenizer (whose card is then written for the next start)."""
    card = read_card(spec)
    if card is not None:
        try:
            return from_card(card)
        except Exception as error:  # a damaged card: rebuild it below
            log.debug("tokenizer card of %s unusable: %s", spec.name, error)
    tokenizer = load_tokenizer(spec)
    fresh = card_of(tokenizer)
    if fresh is not None:
        write_card(spec, fresh)
    return tokenizer
