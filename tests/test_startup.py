"""A one-shot ``layerchain generate`` starts fast (issue 21 item 5): checks without timings.

What the start-up is made of is pinned here structurally, so a regression fails on any
machine: the CLI's imports load no torch, transformers or hivemind (torch alone took 2-4 s
of the 4-9 s ``import layerchain.cli.main`` cost before); the hivemind DHT loads without
hivemind's training stack; the client joins the DHT while its head loads; the phase marks
``layerchain bench startup`` reads are written, and its result has the issue's fields. The
figures are in docs/BENCHMARKS.md "Start-up".
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from layerchain import timings
from layerchain.bench.startup import PHASES, phases_of
from layerchain.errors import ConfigError
from layerchain.model.manifest import cache_dir as manifest_cache_dir

HEAVY = ("torch", "transformers", "hivemind", "scipy", "eth_utils")


def _imports(code: str) -> set[str]:
    """Top-level packages loaded by ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_cli_imports_nothing_heavy():
    loaded = _imports("import layerchain.cli.main")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_help_of_every_command_still_works_without_the_heavy_imports():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom layerchain.cli.main import app\n"
            "runner = CliRunner()\n"
            "for cmd in ([], ['generate'], ['node', 'start'], ['bench', 'startup'],\n"
            "            ['bench', 'memory'], ['swarm', 'up']):\n"
            "    r = runner.invoke(app, [*cmd, '--help'])\n"
            "    assert r.exit_code == 0, (cmd, r.output)\n")
    loaded = _imports(code)
    assert not loaded & {"torch", "transformers", "hivemind"}


def test_the_dht_loads_without_hiveminds_training_stack():
    loaded = _imports("import torch\nimport layerchain.discovery.dht")
    assert "hivemind" in loaded
    assert "scipy" not in loaded  # hivemind.averaging / optim pull it in
    probe = ("import sys\nimport layerchain.discovery.dht\n"
             "assert 'hivemind.averaging' not in sys.modules\n"
             "import hivemind\n"
             "assert hivemind.DHT.__module__ == 'hivemind.dht.dht'\n"  # the rest, on first use
             "assert 'hivemind.averaging' in sys.modules\n"
             "assert hivemind.dht.node.DHTNode is layerchain.discovery.dht.DHTNode\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_marks_are_silent_by_default_and_parse_back(monkeypatch, capsys):
    monkeypatch.delenv(timings.ENV, raising=False)
    timings.mark("command")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(timings.ENV, "1")
    with timings.timed("head_load"):
        pass
    timings.mark("ready")
    marks = timings.parse("noise\n" + capsys.readouterr().err)
    assert set(marks) == {"head_load", "ready"}
    assert marks["head_load"]["s"] is not None and marks["ready"]["s"] is None


def test_bench_startup_result_has_the_issues_fields():
    marks = {"command": {"at": 101.0, "s": None}, "dht_join": {"at": 102.0, "s": 0.5},
             "head_load": {"at": 103.0, "s": 1.5}, "ready": {"at": 103.1, "s": None},
             "first_token": {"at": 103.6, "s": None}}
    got = phases_of(marks, started_at=100.0, ended_at=104.0)
    assert set(got) == set(PHASES)
    assert {"import_s", "dht_join_s", "head_load_s", "first_token_s", "total_s"} <= set(got)
    assert got == {"import_s": 1.0, "dht_join_s": 0.5, "head_load_s": 1.5,
                   "first_token_s": 0.5, "ready_s": 3.1, "total_s": 4.0}
    with pytest.raises(KeyError):
        phases_of({k: v for k, v in marks.items() if k != "first_token"}, 100.0, 104.0)


def test_the_client_joins_the_dht_while_its_head_loads(monkeypatch):
    """AsyncSwarm.create starts the DHT join before the head loads and awaits it after: the
    two overlap (a one-shot generate waits for the longer, not the sum)."""
    import layerchain.client.swarm as client_swarm

    events: list[str] = []
    joined = threading.Event()

    class FakeDiscovery:
        async def close(self) -> None:
            events.append("closed")

    async def fake_join(peers):
        events.append("join started")
        await asyncio.sleep(0.05)
        joined.set()
        events.append("joined")
        return FakeDiscovery()

    class FakeSpec:  # what the client reads of a spec before its head loads
        def in_form(self, dtype):
            return self

    def fake_resolve(model):
        events.append("resolve")
        if model == "broken":  # fails after the join is up
            assert joined.wait(5)
            raise ConfigError("no such model")
        return FakeSpec()

    def fake_head(spec, **_):
        events.append(f"head (joined: {joined.is_set()})")
        return object()

    monkeypatch.setattr(client_swarm, "join_as_client", fake_join)
    monkeypatch.setattr(client_swarm, "resolve_model", fake_resolve)
    monkeypatch.setattr(client_swarm, "check_private_blocks", lambda spec, n: None)
    monkeypatch.setattr(client_swarm, "load_head", fake_head)
    monkeypatch.setattr(client_swarm, "resolve_dtype", lambda d, dev: d)
    monkeypatch.setattr(client_swarm, "load_client_tokenizer", lambda spec: object())
    built = {}
    monkeypatch.setattr(client_swarm.AsyncSwarm, "__init__",
                        lambda self, **kw: built.update(kw))

    asyncio.run(client_swarm.AsyncSwarm.create(["/ip4/127.0.0.1/tcp/1/p2p/x"]))
    # the join began before the head loaded, and ended after: they overlapped
    assert events.index("join started") < events.index("head (joined: False)")
    assert isinstance(built["discovery"], FakeDiscovery)

    events.clear()
    joined.clear()
    with pytest.raises(ConfigError, match="no such model"):
        asyncio.run(client_swarm.AsyncSwarm.create(["/ip4/127.0.0.1/tcp/1/p2p/x"],
                                                   model="broken"))
    assert events[-2:] == ["joined", "closed"]  # the DHT that got up is not left running


# ------------------------------------------------- the client's head without transformers


def test_the_client_head_loads_without_transformers(smollm2_spec):
    """Resolving the default model and loading its head (what ``AsyncSwarm.create`` does before
    the tokenizer) imports no transformers at all, so neither its modeling modules
    (``torch._dynamo``) nor its config classes (``torch.distributed.tensor``): most of what a
    one-shot generate spent before (docs/BENCHMARKS.md "Start-up"). (Its manifest is cached,
    as after this machine's first start: ``model.manifest`` builds it once, through
    transformers' layer classes, since the model id is its hash.)"""
    code = ("import sys\nfrom layerchain.model import resolve_model, load_head\n"
            "head = load_head(resolve_model('smollm2'))\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'\n"
            "               or m.startswith(('torch._dynamo', 'torch.distributed.tensor')))\n"
            "assert not heavy, heavy[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_whole_client_start_imports_no_transformers_once_the_card_is_written(tmp_path,
                                                                                 smollm2_spec):
    """The client's start (``AsyncSwarm.create``: model, head, tokenizer; a prompt). The first one
    builds the tokenizer through transformers (no modeling module nor torch's compiler stack
    even then) and writes its card; every later one imports no transformers at all."""
    code = ("import asyncio, sys\nfrom layerchain.client.swarm import AsyncSwarm\n"
            "from layerchain.model import encode_prompt\n"
            "class Discovery:  # given: no DHT join (read nothing at create)\n"
            "    async def close(self): pass\n"
            "swarm = asyncio.run(AsyncSwarm.create(discovery=Discovery(), transport=object()))\n"
            "assert swarm.eos_token_ids == [2] and swarm.context_length == 8192\n"
            "encode_prompt(swarm.tokenizer, 'Hi')\n"
            "bad = sorted(m for m in sys.modules if '.modeling_' in m or m.endswith('modeling_utils')\n"
            "             or m.startswith(('torch._dynamo', 'torch.distributed.tensor')))\n"
            "assert not bad, bad[:5]\n"
            "print('transformers' in sys.modules)\n")
    env = {**os.environ, "LAYERCHAIN_HOME": str(tmp_path)}
    # the model's manifest as this machine's first start cached it (``model.manifest``: built
    # once, through transformers' layer classes); what is measured here is the card
    shutil.copytree(manifest_cache_dir(), tmp_path / "cache" / "manifests")

    def transformers_loaded() -> bool:
        done = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env,
                              capture_output=True, text=True)
        return done.stdout.strip().splitlines()[-1] == "True"

    assert transformers_loaded()  # no card yet: built through transformers, card written
    assert list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    assert not transformers_loaded()


# ------------------------------------------ the client's tokenizer from its card: same results

_TEXTS = ("Hi", "What is the capital of France?", "  leading spaces\nand\ttabs  ",
          "Ünïcödé, 日本語, emoji 🚀👍🏽, a rare one \ud7ff", "<|im_start|>user\nhello<|im_end|>",
          "<|endoftext|> text after a special token", "", " ", "a" * 300, "print('x')\n    return 1")
_CHATS = (
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3? 🚀"}],
    [{"role": "user", "content": "<|im_end|> injected"}],
)


@pytest.fixture(scope="module")
def light_and_reference(smollm2_spec, smollm2_tokenizer):
    from layerchain.model.light_tokenizer import card_of, from_card

    card = card_of(smollm2_tokenizer)
    assert card is not None
    return from_card(json.loads(json.dumps(card))), smollm2_tokenizer  # as stored


def test_light_tokenizer_encodes_like_transformers(light_and_reference):
    from layerchain.bench.compute import PROMPTS
    from layerchain.model.tokenizer import encode_prompt

    light, ref = light_and_reference
    for text in (*_TEXTS, *PROMPTS):
        for special in (True, False):
            assert light.encode(text, add_special_tokens=special) == list(
                ref.encode(text, add_special_tokens=special)), (text, special)
    for prompt in (*_TEXTS[:6], *PROMPTS, *_CHATS):
        for raw in (False, True):
            assert encode_prompt(light, prompt, raw) == encode_prompt(ref, prompt, raw), prompt


def test_light_tokenizer_renders_the_chat_template_like_transformers(light_and_reference):
    light, ref = light_and_reference
    assert light.chat_template == ref.chat_template
    for chat in _CHATS:
        for generation in (True, False):
            assert light.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation) \
                == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)


def test_light_tokenizer_decodes_like_transformers(light_and_reference):
    light, ref = light_and_reference
    assert light.get_vocab() == ref.get_vocab()
    assert light.eos_token_id == ref.eos_token_id
    gen = torch.Generator().manual_seed(5)
    vocab = len(ref.get_vocab())
    sequences = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (1, 2, 7, 40)]
    sequences += [ref.encode(t) for t in _TEXTS] + [[0, 1, 2, 3], [2]]
    for ids in sequences:
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip), (ids, skip)


def test_light_tokenizer_finds_the_same_stop_tokens(light_and_reference):
    """End-of-turn ids come from one lookup per token (not a dict of the whole vocabulary,
    ~0.1 s of a one-shot generate): the same set as transformers' vocabulary gives."""
    from layerchain.model.sampling import _END_OF_TURN, default_eos_ids

    light, ref = light_and_reference
    vocab = ref.get_vocab()
    assert [light.token_to_id(t) for t in _END_OF_TURN] == [vocab.get(t) for t in _END_OF_TURN]
    assert light.token_to_id("<|no such token|>") is None
    assert default_eos_ids(light) == default_eos_ids(ref)
    assert len(default_eos_ids(light)) >= 2  # SmolLM2: <|endoftext|> and <|im_end|>


def test_a_card_is_used_only_when_it_matches(smollm2_spec, monkeypatch, tmp_path):
    """No card: transformers' tokenizer, card written. A card: LightTokenizer. A card written
    by other library versions, or damaged: transformers again (and the card rewritten)."""
    from layerchain.model import light_tokenizer as lt

    monkeypatch.setenv("LAYERCHAIN_HOME", str(tmp_path))
    path = lt.card_dir() / f"{smollm2_spec.model_id}.json"
    assert not isinstance(lt.load_client_tokenizer(smollm2_spec), lt.LightTokenizer)
    assert path.is_file()
    assert isinstance(lt.load_client_tokenizer(smollm2_spec), lt.LightTokenizer)
    card = json.loads(path.read_text())
    path.write_text(json.dumps({**card, "versions": {**card["versions"], "tokenizers": "0.0.1"}}))
    assert not isinstance(lt.load_client_tokenizer(smollm2_spec), lt.LightTokenizer)
    assert json.loads(path.read_text())["versions"] == card["versions"]  # rewritten
    path.write_text(json.dumps({**card, "backend": "{not json"}))
    assert not isinstance(lt.load_client_tokenizer(smollm2_spec), lt.LightTokenizer)
    assert isinstance(lt.load_client_tokenizer(smollm2_spec), lt.LightTokenizer)


def test_a_tokenizer_the_light_one_cannot_match_gets_no_card(smollm2_tokenizer, monkeypatch):
    from layerchain.model.light_tokenizer import card_of

    monkeypatch.setattr(smollm2_tokenizer, "clean_up_tokenization_spaces", True)
    assert card_of(smollm2_tokenizer) is None
    monkeypatch.setattr(smollm2_tokenizer, "clean_up_tokenization_spaces", False)
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", "{% generation %}x{% endgeneration %}")
    assert card_of(smollm2_tokenizer) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma",
                                    "gemma3_text", "qwen3_moe", "mixtral", "olmoe"])
def test_head_norm_is_bit_identical_to_the_familys_own_class(family, dtype):
    from layerchain.model.families import FAMILIES
    from layerchain.model.head import HeadNorm

    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma3_text",
                             "qwen3_moe", "mixtral", "olmoe"}  # a new one: add it
    info = FAMILIES[family]
    gen = torch.Generator().manual_seed(7)
    hidden_size, eps = 96, 1e-5
    weight = torch.randn(hidden_size, generator=gen)
    theirs = info.rms_norm(hidden_size, eps=eps)
    theirs.load_state_dict({"weight": weight})
    ours = HeadNorm(weight.clone(), eps, info.norm_offset)
    cast = getattr(torch, dtype)
    theirs.to(cast)
    ours.to(cast)
    for shape in [(1, 1, hidden_size), (2, 7, hidden_size)]:
        hidden = (torch.randn(*shape, generator=gen) * 3).to(cast)
        with torch.inference_mode():
            a, b = theirs(hidden), ours(hidden)
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_head_logits_are_bit_identical_to_transformers_norm_and_lm_head(smollm2_spec):
    """The head (HeadNorm) vs the same tables run through transformers' LlamaRMSNorm, on
    SmolLM2's real weights: the same logits bit for bit."""
    import torch.nn.functional as F

    from layerchain.model import load_head

    head = load_head(smollm2_spec)
    state = smollm2_spec.source.head_state()
    norm = smollm2_spec.family_info.rms_norm(smollm2_spec.hidden_size,
                                             eps=smollm2_spec.config.rms_norm_eps)
    norm.load_state_dict({"weight": state["norm.weight"]})
    hidden = torch.randn(1, 5, smollm2_spec.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = F.linear(norm(hidden), state["embed_tokens.weight"])
    assert torch.equal(head.logits(hidden), expected)
    assert smollm2_spec.shape.rms_norm_eps == smollm2_spec.config.rms_norm_eps


_KEYS = ("block_count", "embedding_length", "context_length", "attention.layer_norm_rms_epsilon",
         "eos")


def _metadata_gguf(path, arch: str, name: str, tied: bool, drop: str | None = None) -> None:
    """A small GGUF file: the metadata a config is read from, embeddings (and an LM head)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    adders = {"block_count": lambda: writer.add_block_count(3),
              "embedding_length": lambda: writer.add_embedding_length(8),
              "context_length": lambda: writer.add_context_length(96),
              "attention.layer_norm_rms_epsilon": lambda: writer.add_layer_norm_rms_eps(1e-5),
              "eos": lambda: writer.add_eos_token_id(4)}
    for key, add in adders.items():
        if key != drop:
            add()
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_feed_forward_length(16)
    writer.add_token_list([f"t{i}" for i in range(10)])  # vocab_size: the tokens' count
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), np.float32))
    if not tied:
        writer.add_tensor("output.weight", np.ones((10, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("drop", [None, *_KEYS])
@pytest.mark.parametrize(("arch", "name"), [("llama", "tiny llama"), ("llama", "Tiny Mistral"),
                                            ("qwen2", "tiny qwen2"), ("phi3", "tiny phi3")])
def test_gguf_shape_is_what_transformers_config_says(arch, name, drop, tmp_path):
    """The shape read from the metadata alone equals the one of transformers' config of the
    file, per architecture, tied or not, and with any one key missing (then the config's
    default applies: the light read falls back to it)."""
    from layerchain.model.gguf_file import GGUFFile, gguf_config, gguf_shape
    from layerchain.model.shape import shape_of

    for tied in (True, False):
        path = tmp_path / f"{arch}-{tied}.gguf"
        _metadata_gguf(path, arch, name, tied, drop)
        file = GGUFFile(path)
        assert gguf_shape(file) == shape_of(gguf_config(file))


def test_the_default_models_shape_and_config_agree(smollm2_spec):
    from layerchain.model.shape import shape_of

    assert smollm2_spec.shape == shape_of(smollm2_spec.config)
    assert smollm2_spec.shape.model_type == "llama" and smollm2_spec.shape.eos_token_id == (2,)
