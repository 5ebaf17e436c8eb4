"""``default_eos_ids`` reads a tokenizer's vocabulary once (a client starting N streams
read it N times: 80 ms of CPU each for SmolLM2, on the loop every stream shares)."""

from __future__ import annotations

from layerchain.model.sampling import default_eos_ids


class Tok:
    eos_token_id = 2

    def __init__(self) -> None:
        self.reads = 0

    def get_vocab(self) -> dict[str, int]:
        self.reads += 1
        return {"a": 0, "<|im_end|>": 7, "</s>": 2}


def test_the_vocabulary_is_read_once_per_tokenizer():
    tok, other = Tok(), Tok()
    assert default_eos_ids(tok) == {2, 7}
    assert default_eos_ids(tok) == {2, 7} and tok.reads == 1
    assert default_eos_ids(other) == {2, 7} and other.reads == 1  # each its own


def test_a_tokenizer_without_weak_references_is_read_each_time():
    class Bare:  # no __weakref__: cannot be a WeakKeyDictionary key
        __slots__ = ("reads",)
        eos_token_id = None

        def __init__(self) -> None:
            self.reads = 0

        def get_vocab(self) -> dict[str, int]:
            self.reads += 1
            return {"<|eot_id|>": 5}

    tok = Bare()
    assert default_eos_ids(tok) == {5} and default_eos_ids(tok) == {5} and tok.reads == 2
