"""Fixtures shared across test areas: the default model and tiny random models of each family.

* ``smollm2_spec``: the resolved default model (SmolLM2-135M-Instruct GGUF), once per session.
* ``reference(model, prompt, params)``: the single-process model's answer, the swarm's
  yardstick, computed once per session.
* ``record_for(identity, start, end, expires_at=None, **fields)``: a peer record to announce.
* ``tiny_model_dir(family, tokenizer=False)``: a Hugging Face directory (config.json +
  model.safetensors) of a 4-block random-weight model of ``family`` ("llama", "mistral",
  "qwen2", "phi3", "gemma"), built once per session without downloads. With
  ``tokenizer=True`` it uses SmolLM2's vocabulary and tokenizer, so it runs everything a real
  model runs (chat template, generation) in milliseconds: good for in-process swarms.
"""

from __future__ import annotations

from layerchain.openmp import tune_openmp

tune_openmp()  # as the `layerchain` command does, before torch loads: in-process swarms share cores

import atexit  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from layerchain.ledger import LedgerConfig, open_ledger  # noqa: E402

if TYPE_CHECKING:
    from layerchain.model import DecodeResult, SamplingParams

TINY_FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma")

# What layerchain keeps under its home (tokenizer cards, chain deployment files) goes to a
# fresh directory per test session, inherited by every process a test starts: tests never
# read or write the user's ~/.layerchain, and each session starts without cached cards.
_HOME = tempfile.mkdtemp(prefix="layerchain-home-")
os.environ["LAYERCHAIN_HOME"] = _HOME
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)


def tiny_config(family: str, vocab_size: int = 256, **overrides):
    """A small config of ``family``: 4 blocks, hidden 64, GQA, sliding windows where they exist
    (``overrides``: other config values)."""
    from transformers import CONFIG_MAPPING

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    extra = {
        "llama": dict(tie_word_embeddings=False),
        "mistral": dict(
            sliding_window=8, tie_word_embeddings=False
        ),  # windows shorter than the test
        "qwen2": dict(
            use_sliding_window=True, sliding_window=8, max_window_layers=2, tie_word_embeddings=True
        ),  # layers 2, 3 slide; 0, 1 do not
        "phi3": dict(tie_word_embeddings=False),
        "gemma": dict(head_dim=16, tie_word_embeddings=True),
    }[family]
    return CONFIG_MAPPING[family](**{**common, **extra, **overrides})


def make_tiny_model(family: str, path, tokenizer=None, seed: int = 0, **overrides):
    """Save a random-weight model of ``family`` (and ``tokenizer``, if given) into ``path``
    (``overrides``: config values other than ``tiny_config``'s)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    vocab = 256 if tokenizer is None else len(tokenizer)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab, **overrides))
    with torch.no_grad():  # norms away from their init values, so their handling shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


# a tiny model whose q/k/v (128/64/64) and gate/up (128) fuse as int4 on every CPU
# (tiny_config's 64/32/32 and 96 do not where torch packs int4 rows in blocks of 64)
ALIGNED = dict(hidden_size=128, intermediate_size=128)


@pytest.fixture(scope="session")
def aligned_model_dir(tmp_path_factory, request):
    """Factory: ``aligned_model_dir(family, tokenizer=False) -> Path`` (once per session)."""
    made = {}

    def make(family: str, tokenizer: bool = False):
        if (family, tokenizer) not in made:
            tok = request.getfixturevalue("smollm2_tokenizer") if tokenizer else None
            path = tmp_path_factory.mktemp(f"aligned-{family}")
            made[family, tokenizer] = make_tiny_model(family, path, tok, **ALIGNED)
        return made[family, tokenizer]

    return make


@pytest.fixture(scope="session")
def smollm2_spec():
    from layerchain.model import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_spec):
    from layerchain.model import load_tokenizer

    return load_tokenizer(smollm2_spec)


@pytest.fixture(scope="session")
def reference():
    """Factory: ``reference(model, prompt, params) -> DecodeResult``, the single-process
    model's answer (``LocalModel``): what a swarm must produce, token for token.

    ``model`` is a model reference (``DEFAULT_MODEL``, a ``tiny_model_dir`` path); each model
    loads once and each answer is computed once per session.
    """
    from layerchain.model import LocalModel, resolve_model

    models: dict[str, LocalModel] = {}
    answers: dict[tuple[str, object, SamplingParams], DecodeResult] = {}

    def answer(model: str | os.PathLike[str], prompt: str, params: SamplingParams) -> DecodeResult:
        ref = os.fspath(model)
        if ref not in models:
            models[ref] = LocalModel(resolve_model(ref))
        key = (ref, prompt, params)
        if key not in answers:
            answers[key] = models[ref].generate(prompt, params)
        return answers[key]

    return answer


@pytest.fixture
def record_for(request):
    """Factory: ``record_for(identity, start, end, expires_at=None, **fields) -> PeerRecord``.

    A well-formed (unsigned) record of ``identity`` serving blocks ``[start, end)`` of the test
    module's ``MODEL`` (else "test-model") at ``tcp://127.0.0.1:{4000 + start}``; it expires at
    ``expires_at`` (default: a minute from now); ``fields`` override any other field.
    """
    from layerchain.discovery import PeerRecord
    from layerchain.discovery.base import tombstone

    model_id = getattr(request.module, "MODEL", "test-model")

    def make(identity, start: int, end: int, expires_at: float | None = None, **fields) -> PeerRecord:
        expires = time.time() + 60.0 if expires_at is None else expires_at
        # a tombstone carries the identity and the span; add what a serving node announces
        live = dict(endpoints=(f"tcp://127.0.0.1:{4000 + start}",), ms_per_block=1.0,
                    price_per_block=1, free_cache_tokens=1024, version="0.1.0")
        return dataclasses.replace(
            tombstone(identity, model_id, start, end, expires), **{**live, **fields}
        )

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, request):
    """Factory: ``tiny_model_dir(family, tokenizer=False) -> Path`` (built once per session)."""
    made = {}

    def make(family: str = "llama", tokenizer: bool = False):
        key = (family, tokenizer)
        if key not in made:
            tok = request.getfixturevalue("smollm2_tokenizer") if tokenizer else None
            path = tmp_path_factory.mktemp(f"tiny-{family}{'-tok' if tokenizer else ''}")
            made[key] = make_tiny_model(family, path, tok)
        return made[key]

    return make


@pytest.fixture
def ledger(tmp_path):
    """A fresh SQLite ledger whose dispute window (60 s) outlasts a priced node's 30 s
    redemption interval (priced nodes refuse a shorter one)."""
    book = open_ledger(tmp_path / "ledger.sqlite", LedgerConfig(dispute_window_s=60))
    yield book
    book.close()

