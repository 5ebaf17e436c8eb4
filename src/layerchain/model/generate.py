"""The decode loop, without I/O, and the single-process reference generation.

A generation is: tokenize the prompt, embed it (``Head.embed``), push the hidden states
through blocks ``[0, L)`` (one span locally, a chain of hops on the swarm), turn the last
position into logits (``Head.logits``), pick a token (``Sampler``), turn it into text and
check for the end (``StopChecker``), embed that one token and repeat. ``Decoder`` holds that
loop's state and does everything but running the blocks, so the same code drives the local
reference and the client::

    decoder = Decoder(head, tokenizer, prompt_ids, params)
    while (hidden := decoder.next_input()) is not None:   # [1, T, H]: the prompt, then 1 token
        out = run_blocks(hidden)                           # [1, T, H]: spans 0..L in order
        text = decoder.accept(out)                         # new text (may be "")
    result = decoder.result()                              # DecodeResult

``run_blocks`` may be synchronous (``span.forward(hidden, cache)``) or awaited hop by hop; the
client keeps each hop's inputs to replay them after a failover. ``generate_local`` runs the
whole model in this process as one ``SpanModel`` over ``[0, L)``, through the same span code the
nodes run, and is the reference the swarm must match token for token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from layerchain.errors import ConfigError
from layerchain.model.adapter import Adapter
from layerchain.model.head import Head, load_head
from layerchain.model.sampling import Sampler, SamplingParams, StopChecker
from layerchain.model.span import SpanModel, load_span
from layerchain.model.spec import ModelSpec
from layerchain.model.tokenizer import Message, encode_prompt, load_tokenizer


@dataclass(frozen=True)
class DecodeResult:
    """What a decode loop produced (locally; the swarm's ``GenerationResult`` extends it)."""

    text: str  # generated text, without any stop string
    token_ids: tuple[int, ...]  # generated ids only (an EOS that ended it included)
    prompt_token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS or stop string) | "length" (max_new_tokens)
    tokens_per_s: float  # decode rate: tokens after the first / seconds after the first

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def to_json(self) -> dict[str, Any]:
        """The ``generate --json`` object."""
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "tokens_per_s": round(self.tokens_per_s, 3),
        }


class Decoder:
    """The state of one generation's decode loop (see module docstring); no I/O."""

    def __init__(
        self,
        head: Head,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Sequence[int] | None = None,
        prefix: torch.Tensor | None = None,  # [N, H] embeddings put before the prompt's
        # (a prompt-tuning adapter, ``model.adapter``); they take positions 0..N-1
    ) -> None:
        if not prompt_ids:
            raise ConfigError("the prompt has no tokens")
        self.head, self.params = head, params
        self.prefix = prefix
        self.prompt_ids = tuple(int(i) for i in prompt_ids)
        self.sampler = Sampler(params)
        self.stop = StopChecker(tokenizer, params, eos_token_ids)
        self._history = list(self.prompt_ids)
        self._pending: list[int] | None = list(self.prompt_ids)
        self._started = time.perf_counter()
        self._times: list[float] = []

    @property
    def done(self) -> bool:
        return self.stop.done

    def next_input(self) -> torch.Tensor | None:
        """Hidden states [1, T, H] to push through all blocks next; None when finished."""
        if self.done or self._pending is None:
            return None
        ids = torch.tensor([self._pending], dtype=torch.long)
        first = len(self._history) == len(self.prompt_ids)  # the prompt: no token yet
        self._pending = None
        hidden = self.head.embed(ids)
        if first and self.prefix is not None:
            prefix = self.prefix.to(device=hidden.device, dtype=hidden.dtype)
            hidden = torch.cat([prefix.unsqueeze(0), hidden], dim=1)  # [1, N + T, H]
        return hidden

    def accept(self, hidden: torch.Tensor) -> str:
        """Take the blocks' output [1, T, H] for the last input; return the new text."""
        return self.accept_logits(self.head.logits(hidden[:, -1:])[0, -1])

    def accept_logits(self, logits: torch.Tensor) -> str:
        """``accept`` from the head's logits [V] of the output's last position, computed by
        the caller (``client.heads`` batches the heads of concurrent generations)."""
        token = self.sampler.next_token(logits, self._history)
        self._times.append(time.perf_counter())
        self._history.append(token)
        text, done = self.stop.feed(token)
        if not done:
            self._pending = [token]
        return text

    def result(self) -> DecodeResult:
        n, times = len(self.stop.token_ids), self._times
        if n >= 2 and times[-1] > times[0]:
            rate = (n - 1) / (times[-1] - times[0])
        else:
            rate = n / max(times[-1] - self._started, 1e-9) if times else 0.0
        return DecodeResult(
            self.stop.text,
            tuple(self.stop.token_ids),
            self.prompt_ids,
            self.stop.finish_reason or "length",
            rate,
        )


class LocalModel:
    """A whole model in this process: one span over all blocks, the head and the tokenizer."""

    def __init__(self, spec: ModelSpec, *, dtype: str = "fp32", device: str = "cpu") -> None:
        self.spec = spec  # dtype: the weights' form (concrete, ``quant.resolve_dtype``)
        # device: where span, cache and head compute (``model.device``); CPU is the reference
        self.span: SpanModel = load_span(spec, 0, spec.num_blocks, dtype=dtype, device=device)
        self.head: Head = load_head(spec, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(spec)

    def generate(
        self,
        prompt: str | Sequence[Message],
        params: SamplingParams,
        raw: bool = False,
        on_text: Callable[[str], None] | None = None,
        adapter: Adapter | None = None,  # fine-tuned (``model.adapter``): prefix, LoRA head
    ) -> DecodeResult:
        prompt_ids = encode_prompt(self.tokenizer, prompt, raw=raw)
        if adapter is not None:
            adapter.check(self.spec)
        decoder = Decoder(
            self.head if adapter is None else adapter.apply(self.head), self.tokenizer,
            prompt_ids, params, eos_token_ids(self.spec.config),
            prefix=None if adapter is None else adapter.prefix,
        )
        virtual = 0 if adapter is None else adapter.virtual_tokens
        cache = self.span.new_cache(max_length=len(prompt_ids) + virtual + params.max_new_tokens)
        with torch.inference_mode():
            while (hidden := decoder.next_input()) is not None:
                text = decoder.accept(self.span(hidden, cache))
                if text and on_text is not None:
                    on_text(text)
        return decoder.result()


def generate_local(
    spec: ModelSpec,
    prompt: str | Sequence[Message],
    params: SamplingParams,
    raw: bool = False,
    on_text: Callable[[str], None] | None = None,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    adapter: Adapter | None = None,
) -> DecodeResult:
    """Generate with the whole model in this process (on ``device``, ``model.device``);
    ``on_text`` receives streamed text.

    Loads the model each call; keep a ``LocalModel`` to generate several times.
    """
    model = LocalModel(spec, dtype=dtype, device=device)  # dtype concrete: quant.resolve_dtype
    return model.generate(prompt, params, raw=raw, on_text=on_text, adapter=adapter)


def eos_token_ids(config: Any) -> list[int]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
