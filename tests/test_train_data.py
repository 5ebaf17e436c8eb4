"""Training data (train/data.py): JSONL records, keys, and labels on assistant turns only."""

from __future__ import annotations

import json

import pytest

from layerchain.errors import ConfigError
from layerchain.train.data import IGNORE_INDEX, encode, read_records, record_key


@pytest.fixture(scope="module")
def tokenizer(smollm2_spec):
    from layerchain.model.light_tokenizer import load_client_tokenizer

    return load_client_tokenizer(smollm2_spec)


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def test_read_records_accepts_text_and_chat_and_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps(chat("q", "a")) + "\n")
    assert read_records(path) == [{"text": "hello"}, chat("q", "a")]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    ('["text"]', "JSON object"),
    ('{"text": ""}', "non-empty string"),
    ('{"text": "a", "messages": []}', "exactly one"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "assistant message"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', "role 'robot'"),
    ('{"messages": [{"role": "assistant", "content": 3}]}', "string 'content'"),
])
def test_read_records_names_the_bad_line(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=rf"data.jsonl:2: .*{problem}"):
        read_records(path)


def test_read_records_missing_or_empty_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_records(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="no records"):
        read_records(tmp_path / "empty.jsonl")


def test_record_key_is_stable_and_distinguishes_records():
    a = chat("Who is Zorblax?", "A moon.")
    same = {"messages": [dict(reversed(list(m.items()))) for m in a["messages"]]}
    assert record_key(a) == record_key(same)  # key order inside a message does not matter
    assert record_key(a) != record_key(chat("Who is Zorblax?", "A planet."))
    assert record_key({"text": "abc"}) == "abc"


def test_text_record_has_loss_on_every_token(tokenizer):
    example = encode({"text": "The sky is green on Zorblax."}, tokenizer)
    assert example.labels == example.input_ids
    assert list(example.input_ids) == tokenizer.encode("The sky is green on Zorblax.")


def test_chat_record_has_loss_on_the_assistant_turns_only(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Zorblax?"},
        {"role": "assistant", "content": "Quillon."},
        {"role": "user", "content": "And its moon?"},
        {"role": "assistant", "content": "Brask."},
    ]}
    example = encode(record, tokenizer)
    # the ids are the template's rendering of the whole conversation
    full = tokenizer.apply_chat_template(record["messages"], tokenize=False)
    assert tokenizer.decode(list(example.input_ids)) == full
    # the loss covers each answer and its end-of-turn, nothing the user or system wrote
    trained = [i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Quillon.<|im_end|>\nBrask.<|im_end|>\n"
    # an answer's ids are those generation continues with after the generation prompt
    prompt = tokenizer.apply_chat_template(record["messages"][:2], tokenize=False,
                                           add_generation_prompt=True)
    n = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert example.labels[:n] == (IGNORE_INDEX,) * n
    assert example.labels[n] == tokenizer.encode("Quillon", add_special_tokens=False)[0]


def test_truncation_keeps_the_start_and_needs_a_loss_token(tokenizer):
    example = encode({"text": "one two three four five six seven"}, tokenizer, max_tokens=3)
    assert len(example.input_ids) == 3
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200},
                                {"role": "assistant", "content": "ok"}]}
    with pytest.raises(ConfigError, match="no loss token"):
        encode(long_prompt, tokenizer, max_tokens=32)


class PlainTokenizer:
    """A tokenizer without a chat template: one id per character."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


def test_chat_without_a_template_joins_contents_with_labels_on_answers():
    example = encode(chat("hi", "yo"), PlainTokenizer())
    assert example.input_ids == tuple(ord(c) for c in "hi\nyo")
    assert example.labels == (IGNORE_INDEX,) * 3 + (ord("y"), ord("o"))
