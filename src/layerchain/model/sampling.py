"""Choosing the next token and knowing when to stop.

``Sampler`` turns one position's logits into a token id: repetition penalty, then greedy
(``temperature == 0``) or temperature, top-k and top-p sampling from a seeded generator, so a
seed gives the same tokens on every run and on every route. ``StopChecker`` turns sampled ids
into text, incrementally and safely for tokens that end inside a multi-byte character, and
says when to stop: an end-of-sequence token, a stop string (never part of the returned text),
or ``max_new_tokens``. Neither knows about models or networks.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch

from layerchain.model.params import SamplingParams as SamplingParams  # re-exported (its old home)

# end-of-turn tokens of common chat templates, treated as EOS when the vocabulary has them
_END_OF_TURN = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


class Sampler:
    """Picks next tokens for one generation; deterministic for a given seed and logits."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed)

    def next_token(self, logits: torch.Tensor, history: Iterable[int] = ()) -> int:
        """logits [V] of the next position; ``history``: prompt and generated ids so far."""
        p = self.params
        with torch.inference_mode():
            logits = logits.detach().reshape(-1).float()
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(history)), dtype=torch.long)
                if seen.numel():
                    logits = logits.clone()
                    picked = logits[seen]
                    logits[seen] = torch.where(
                        picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
                    )
            if p.greedy:
                return int(torch.argmax(logits))
            logits = logits / p.temperature
            if 0 < p.top_k < logits.numel():
                kth = torch.topk(logits, p.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                probs = torch.softmax(sorted_logits, dim=-1)
                # drop a token when the ones before it already reach top_p (keeps at least one)
                drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
                logits = logits.scatter(0, order[drop], float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self.generator))


class StopChecker:
    """Turns sampled ids into streamed text and decides when generation ends.

    ``feed(id)`` returns ``(new_text, done)``. Text is decoded incrementally (the
    prefix/read-offset method: decode a few ids before the new ones and emit the difference,
    holding back text that ends in an incomplete UTF-8 character), and text that could be
    the start of a stop string is held back until it is known not to be one. After ``done``,
    ``text`` is the whole output, ``finish_reason`` is "stop" or "length", and ``token_ids``
    are all sampled ids (the EOS token included when one ended the generation).

    Cost: stop strings are matched by one Knuth-Morris-Pratt automaton each, fed every new
    character once, so a generation's matching work is O(output chars x stop strings) after
    an O(total stop length) set-up, whatever the stop strings' lengths (a scan of the text's
    tail per token was O(stop length^2) per token: minutes for one 100 kB stop string).
    """

    def __init__(
        self, tokenizer: Any, params: SamplingParams, eos_token_ids: Iterable[int] | None = None
    ) -> None:
        self.tokenizer, self.params = tokenizer, params
        self.eos_token_ids = set(eos_token_ids or ()) | default_eos_ids(tokenizer)
        self.token_ids: list[int] = []
        self.text = ""  # emitted so far (never contains a stop string)
        self.finish_reason: str | None = None
        self._decoded = ""  # all decoded text, including what is held back
        self._ids: list[int] = []  # ids that produce text (EOS excluded)
        self._prefix_offset = 0
        self._read_offset = 0
        self._stops = [_StopMatcher(s) for s in params.stop]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token_id: int) -> tuple[str, bool]:
        if self.done:
            return "", True
        self.token_ids.append(token_id)
        if token_id in self.eos_token_ids:
            return self._finish("stop", len(self._decoded))
        self._ids.append(token_id)
        before = len(self._decoded)
        new = self._decode_new()
        self._decoded += new
        if self._stops:
            # where each stop string first ends in the new text; the earliest start wins
            hits = [i for m in self._stops if (i := m.feed(new, before)) is not None]
            if hits:
                return self._finish("stop", min(hits))
        if len(self.token_ids) >= self.params.max_new_tokens:
            return self._finish("length", len(self._decoded))
        held = max((m.matched for m in self._stops), default=0)  # a stop string may start here
        return self._emit(len(self._decoded) - held), False

    def _finish(self, reason: str, end: int) -> tuple[str, bool]:
        self.finish_reason = reason
        return self._emit(end), True

    def _emit(self, end: int) -> str:
        """The text from what was emitted so far up to ``_decoded[end]``, now emitted."""
        new = self._decoded[len(self.text) : end]
        self.text += new
        return new

    def _decode_new(self) -> str:
        decode = self.tokenizer.decode
        prefix: str = decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=True
        )
        full: str = decode(self._ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""  # incomplete character: wait for the next token


class _StopMatcher:
    """One stop string's Knuth-Morris-Pratt automaton over a growing text.

    ``matched`` is the length of the longest prefix of the stop string that the text ends
    with (what must be held back); each character fed costs amortised O(1)."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.matched = 0
        # fail[q] = length of the longest proper prefix of stop[:q + 1] that is also its suffix
        fail = [0] * len(stop)
        k = 0
        for q in range(1, len(stop)):
            while k and stop[q] != stop[k]:
                k = fail[k - 1]
            if stop[q] == stop[k]:
                k += 1
            fail[q] = k
        self._fail = fail

    def feed(self, text: str, offset: int) -> int | None:
        """Advance over ``text``, which starts at index ``offset`` of the whole text; the
        index where the stop string starts if it ends inside ``text``, else None."""
        stop, fail, q = self.stop, self._fail, self.matched
        for i, char in enumerate(text):
            while q and stop[q] != char:
                q = fail[q - 1]
            if stop[q] == char:
                q += 1
                if q == len(stop):
                    self.matched = q
                    return offset + i + 1 - q
        self.matched = q
        return None


def default_eos_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's EOS id plus the end-of-turn tokens its vocabulary has."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(_end_of_turn_ids(tokenizer))
    return ids


# tokenizer -> its end-of-turn ids: get_vocab() builds a dict of the whole vocabulary (80 ms
# of CPU for SmolLM2's 49,152 tokens), once per generation before; a client starting 8
# streams held its event loop that long 8 times
_EOT_IDS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def _end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    try:
        return _EOT_IDS[tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that cannot be weakly referenced
        pass
    lookup = getattr(tokenizer, "token_to_id", None)  # LightTokenizer: one token at a time
    if lookup is not None:
        found = frozenset(i for i in map(lookup, _END_OF_TURN) if i is not None)
    else:  # a transformers tokenizer: unknown tokens would map to its unk id
        vocab = tokenizer.get_vocab()
        found = frozenset(vocab[t] for t in _END_OF_TURN if t in vocab)
    try:
        _EOT_IDS[tokenizer] = found
    except TypeError:
        pass
    return found
