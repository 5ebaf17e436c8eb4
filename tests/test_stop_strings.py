"""Stop strings (``StopChecker``): the same text and stream as a direct scan, at linear cost.

A character-level fake tokenizer (id = code point) keeps these tests free of model files;
tests/test_model_sampling.py covers a real tokenizer and multi-byte characters.
"""

from __future__ import annotations

import random
import time

from test_model_sampling import feed_all

from layerchain.model import SamplingParams, StopChecker


class CharTokenizer:
    """One token per character: ``decode`` joins code points, no special tokens."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))

    def get_vocab(self):
        return {}


def stream(stop: tuple[str, ...], pieces: list[str], max_new_tokens: int = 10_000):
    """Feed each piece as one token (its characters as ids decode to it); (chunks, checker)."""
    checker = StopChecker(PieceTokenizer(pieces), SamplingParams(max_new_tokens=max_new_tokens,
                                                                 stop=stop))
    chunks, _ = feed_all(checker, range(len(pieces)))
    return chunks, checker


class PieceTokenizer(CharTokenizer):
    """Token i decodes to ``pieces[i]`` (several characters per token, as real ones do)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def scan(stop: tuple[str, ...], pieces: list[str]) -> tuple[list[str], str | None]:
    """The definition, by brute force: after each token, end at the earliest stop string
    that occurs; otherwise emit all but the longest tail that starts a stop string."""
    decoded, emitted, chunks = "", 0, []
    for piece in pieces:
        decoded += piece
        starts = [i for s in stop if (i := decoded.find(s)) >= 0]
        if starts:
            chunks.append(decoded[emitted:min(starts)])
            return chunks, "stop"
        held = max((n for s in stop for n in range(1, len(s)) if decoded.endswith(s[:n])),
                   default=0)
        chunks.append(decoded[emitted:len(decoded) - held])
        emitted = len(decoded) - held
    chunks[-1] += decoded[emitted:]  # max_new_tokens reached: the rest goes out
    return chunks, "length"


def test_matches_the_brute_force_definition_on_random_overlapping_text():
    rng = random.Random(12)
    for _ in range(400):
        alphabet = "ab" if rng.random() < 0.5 else "abc"
        stop = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                     for _ in range(rng.randint(1, 4)))
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
                  for _ in range(rng.randint(1, 30))]
        pieces = [p or "a" for p in pieces]  # a token always decodes to something here
        chunks, checker = stream(stop, pieces, max_new_tokens=len(pieces))
        want_chunks, want_reason = scan(stop, pieces)
        assert (chunks, checker.finish_reason) == (want_chunks, want_reason), (stop, pieces)
        assert checker.text == "".join(chunks)
        assert not any(s in checker.text for s in stop)


def test_the_earliest_starting_stop_string_wins():
    chunks, checker = stream(("bcd", "c"), ["ab", "cd"])
    assert chunks == ["a", ""] and checker.finish_reason == "stop"  # "bcd" starts first
    chunks, checker = stream(("abcd", "bc"), ["abcd"])
    assert checker.text == "" and chunks == [""]


def test_a_huge_stop_string_costs_linear_time():
    """A 100 kB stop string over 2,000 tokens took ~70 s of CPU with the tail scan."""
    stop = ("x" * 100_000,)
    pieces = ["x" * 40 + "y"] * 2_000  # long runs of the stop string's prefix, never all of it
    t0 = time.process_time()
    chunks, checker = stream(stop, pieces, max_new_tokens=len(pieces))
    elapsed = time.process_time() - t0
    assert checker.finish_reason == "length" and checker.text == "".join(pieces)
    assert elapsed < 2.0, f"{elapsed:.2f} s of CPU for 2,000 tokens"
    # the held-back tail is the run of x's since the last y, never more
    chunks, checker = stream(("x" * 1_000 + "!",), ["x" * 999, "y"], max_new_tokens=2)
    assert chunks == ["", "x" * 999 + "y"] and checker.finish_reason == "length"
