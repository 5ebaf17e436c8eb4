"""Sampling, stopping and prompts: deterministic choices, streamed text, chat templates."""

from __future__ import annotations

import pytest
import torch

from layerchain.errors import ConfigError
from layerchain.model import Sampler, SamplingParams, StopChecker, encode_prompt


def random_logits(seed: int, vocab: int = 1000) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.0),
        dict(stop=("",)),
    ],
)
def test_bad_sampling_params_are_config_errors(bad):
    with pytest.raises(ConfigError):
        SamplingParams(**bad)


def test_greedy_and_repetition_penalty():
    logits = torch.tensor([1.0, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams()).next_token(logits, [1]) == 1
    penalised = Sampler(SamplingParams(repetition_penalty=1.5))
    assert penalised.next_token(logits, [1]) == 2  # 3.0 / 1.5 < 2.9
    assert penalised.next_token(logits, []) == 1
    negative = torch.tensor([-1.0, -1.2, -5.0])
    assert Sampler(SamplingParams(repetition_penalty=2.0)).next_token(negative, [0]) == 1


def test_sampling_is_seeded_and_respects_top_k_top_p():
    params = SamplingParams(temperature=1.0, seed=7)
    runs = [[Sampler(params).next_token(random_logits(i)) for i in range(30)] for _ in range(2)]
    runs_same_sampler = []
    for _ in range(2):
        sampler = Sampler(params)
        runs_same_sampler.append([sampler.next_token(random_logits(i)) for i in range(30)])
    assert runs[0] == runs[1] and runs_same_sampler[0] == runs_same_sampler[1]
    other = Sampler(SamplingParams(temperature=1.0, seed=8))
    assert [other.next_token(random_logits(i)) for i in range(30)] != runs_same_sampler[0]
    greedy = [int(random_logits(i).argmax()) for i in range(30)]
    assert runs_same_sampler[0] != greedy  # it really samples
    top1 = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))
    assert [top1.next_token(random_logits(i)) for i in range(30)] == greedy
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=3))
    assert [nucleus.next_token(random_logits(i)) for i in range(30)] == greedy
    top3 = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=3))
    for i in range(30):
        allowed = set(torch.topk(random_logits(i), 3).indices.tolist())
        assert top3.next_token(random_logits(i)) in allowed


def feed_all(checker, ids):
    pieces = []
    for token in ids:
        text, done = checker.feed(token)
        pieces.append(text)
        if done:
            break
    return pieces, done


def test_stop_strings_never_reach_the_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("The answer is here. END of story", add_special_tokens=False)
    checker = StopChecker(tok, SamplingParams(stop=("END", "never")))
    pieces, done = feed_all(checker, ids)
    assert done and checker.finish_reason == "stop"
    assert "".join(pieces) == checker.text == "The answer is here. "
    assert all("E" not in p for p in pieces)  # no partial stop string was ever streamed
    # a stop string spread over several tokens
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    checker = StopChecker(tok, SamplingParams(stop=("a gam",)))
    pieces, done = feed_all(checker, ids)
    assert done and "".join(pieces) == "alpha bet"


def test_streaming_is_safe_for_multibyte_characters(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Ünïcödé 日本語 🙂 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters split across tokens
    checker = StopChecker(tok, SamplingParams(max_new_tokens=len(ids)))
    pieces, done = feed_all(checker, ids)
    assert done and checker.finish_reason == "length"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_eos_ends_without_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    checker = StopChecker(tok, SamplingParams())
    assert checker.feed(tok.encode("Hi", add_special_tokens=False)[0]) == ("Hi", False)
    assert checker.feed(tok.eos_token_id) == ("", True)
    assert checker.finish_reason == "stop" and checker.token_ids[-1] == tok.eos_token_id
    assert checker.feed(5) == ("", True)


def test_encode_prompt_applies_the_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    chat = encode_prompt(tok, "What is the capital of France?")
    text = tok.decode(chat)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert "Be brief." in tok.decode(encode_prompt(tok, messages))
    raw = encode_prompt(tok, "What is the capital of France?", raw=True)
    assert tok.decode(raw) == "What is the capital of France?"
    with pytest.raises(ConfigError):
        encode_prompt(tok, [{"role": "user"}])
    with pytest.raises(ConfigError):
        encode_prompt(tok, "")
