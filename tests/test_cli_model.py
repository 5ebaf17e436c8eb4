"""`layerchain generate --local` and `layerchain shard convert` through the real app, in-process."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from layerchain.cli.main import app
from layerchain.errors import ConfigError
from layerchain.model.shards import block_file

runner = CliRunner()
PARIS = ["--prompt", "What is the capital of France?", "--max-new-tokens", "16"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error_line(result, *needles):
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_generate_local_answers_paris(smollm2_spec):
    result = invoke("generate", "--local", *PARIS)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_generate_local_json(smollm2_spec, smollm2_tokenizer):
    result = invoke("generate", "--local", "--json", *PARIS)
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert set(obj) == {"text", "token_ids", "tokens_per_s"}
    assert obj["text"] == "The capital of France is Paris."
    assert 0 < len(obj["token_ids"]) <= 16 and all(isinstance(i, int) for i in obj["token_ids"])
    assert smollm2_tokenizer.decode(obj["token_ids"], skip_special_tokens=True) == obj["text"]
    assert isinstance(obj["tokens_per_s"], float) and obj["tokens_per_s"] > 0


def test_generate_json_shape_and_sampling_options(tiny_model_dir):
    model = tiny_model_dir("llama", tokenizer=True)
    args = ["generate", "--local", "--json", "--model", model, "--prompt", "hello", "-n", "5"]
    greedy = json.loads(invoke(*args).stdout)
    assert set(greedy) == {"text", "token_ids", "tokens_per_s"} and len(greedy["token_ids"]) <= 5
    sampled = [
        json.loads(invoke(*args, "--temperature", "1.0", "--top-k", "50", "--seed", s).stdout)
        for s in ("1", "1", "2")
    ]
    assert sampled[0] == {**sampled[1], "tokens_per_s": sampled[0]["tokens_per_s"]}
    assert sampled[0]["token_ids"] != sampled[2]["token_ids"]
    streamed = invoke("generate", "--local", "--model", model, "--prompt", "hello", "-n", "5")
    assert streamed.exit_code == 0 and streamed.stdout == greedy["text"] + "\n"


def test_generate_errors(tiny_model_dir, tmp_path):
    assert_one_error_line(invoke("generate", "--prompt", "hi"), "--initial-peers")
    assert_one_error_line(
        invoke("generate", "--local", "--prompt", "hi", "--model", "nope"),
        "unknown model",
        "smollm2",
    )
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    assert_one_error_line(
        invoke("generate", "--local", "--prompt", "hi", "--model", corrupt), "corrupt.gguf"
    )
    assert_one_error_line(
        invoke("generate", "--local", "--prompt", "hi", "--temperature", "-1"), "temperature"
    )


def test_shard_convert_cli_and_errors(tiny_model_dir, tmp_path, smollm2_spec):
    model = tiny_model_dir("llama", tokenizer=True)
    out = tmp_path / "shards"
    result = invoke("shard", "convert", model, "--out", out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert result.stdout.strip().splitlines() == [result.stdout.strip()]  # one summary line
    assert manifest["model_id"] in result.stdout and (out / block_file(3)).is_file()

    ok = invoke("generate", "--local", "--json", "--model", out, "--prompt", "hi", "-n", "3")
    assert ok.exit_code == 0, ok.output
    target = out / block_file(1)
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    assert_one_error_line(
        invoke("generate", "--local", "--model", out, "--prompt", "hi"), block_file(1), "sha256"
    )

    smollm2 = smollm2_spec.path
    assert_one_error_line(
        invoke("shard", "convert", smollm2, "--out", tmp_path / "x", "--blocks", "25:40"),
        "25:40",
        "30 blocks",
    )
    assert_one_error_line(
        invoke("shard", "convert", smollm2, "--out", tmp_path / "x", "--blocks", "5:5"), "5:5"
    )
    assert not (tmp_path / "x").exists()


def test_sampling_options_build_params():
    from layerchain.cli.generate import sampling_params_from_options

    params = sampling_params_from_options(max_new_tokens=7, temperature=0.5, stop=["\n\n"])
    assert (params.max_new_tokens, params.temperature, params.stop) == (7, 0.5, ("\n\n",))
    with pytest.raises(ConfigError):
        sampling_params_from_options(top_p=2.0)
