"""``--device``: names resolve to a device this machine has, or one clear error line; a span,
its caches and the head stay on their device, every tensor a step creates is made there, and
hidden states cross a node's boundary once in each direction, in the documented dtype.

The CPU tests run everywhere; the CUDA and MPS ones only where such a GPU is usable (skipped
with the reason otherwise), so a CPU-only machine still checks every device-independent rule.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from typer.testing import CliRunner

from layerchain.client.config import ClientConfig
from layerchain.errors import ConfigError
from layerchain.model import LocalModel, SamplingParams, load_head, load_span, resolve_model
from layerchain.model.device import DEVICES, check_device_name, reply_dtype, resolve_device
from layerchain.node import NodeConfig

CUDA = torch.cuda.is_available()
MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")
needs_mps = pytest.mark.skipif(not MPS, reason="no Metal (mps) GPU on this machine")
without_cuda = pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")


def test_names_resolve_to_devices_this_machine_has():
    assert DEVICES == ("auto", "cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if CUDA else "mps" if MPS else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("gpu", "CUDA", "cuda:", "cuda:x", "mps:0", "cpu:1", ""):
        with pytest.raises(ConfigError, match="unknown device"):
            check_device_name(bad)
        with pytest.raises(ConfigError, match="unknown device"):
            resolve_device(bad)


@without_cuda
def test_an_absent_cuda_gpu_is_one_clear_error():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as raised:
            resolve_device(name)
        message = str(raised.value)
        assert "no CUDA GPU" in message and "--device cpu" in message and "\n" not in message


@pytest.mark.skipif(MPS, reason="this machine has a Metal GPU")
def test_an_absent_mps_gpu_is_one_clear_error():
    with pytest.raises(ConfigError, match="no Metal GPU"):
        resolve_device("mps")


def test_configs_check_the_device_name_without_a_gpu():
    assert NodeConfig(device="cuda:1").device == "cuda:1"  # the machine is checked at load
    assert ClientConfig(device="auto").device == "auto"
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        NodeConfig(device="tpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        ClientConfig(device="gpu")


@without_cuda
def test_the_cli_refuses_an_absent_gpu_in_one_line(tiny_model_dir):
    from layerchain.cli.main import app

    model = str(tiny_model_dir("llama", tokenizer=True))
    result = CliRunner().invoke(
        app, ["generate", "--local", "-p", "hi", "-n", "1", "--model", model, "--device", "cuda"]
    )
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no CUDA GPU" in lines[0]


def test_reply_dtype_rule():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    assert reply_dtype(f32, f32) is f32
    assert reply_dtype(f16, f32) is f16  # a float32 span answers in the sender's dtype
    assert reply_dtype(bf16, f32) is bf16
    assert reply_dtype(f32, bf16) is bf16  # a half-precision span sends its own
    assert reply_dtype(f16, bf16) is bf16


def test_a_cpu_span_keeps_everything_on_the_cpu_and_moves_inputs_once(tiny_model_dir):
    spec = resolve_model(tiny_model_dir("llama"))
    span = load_span(spec, 0, spec.num_blocks, device="cpu")
    assert span.device == torch.device("cpu") and span.compute_dtype is torch.float32
    assert all(t.device.type == "cpu" for t in (*span.parameters(), *span.buffers()))
    x = torch.randn(1, 3, spec.hidden_size)
    assert span.to_span(x) is x  # already placed: no copy
    half = x.half()
    moved = span.to_span(half)
    assert moved.dtype is torch.float32 and torch.equal(moved, half.float())
    # a float16 input computes exactly what its float32 value computes
    assert torch.equal(span.forward(half, span.new_cache()), span.forward(half.float(), span.new_cache()))
    # .to() keeps the placement current: a bfloat16 span computes (and says it computes) in bf16
    cast = load_span(spec, 0, 2).to(torch.bfloat16)
    assert cast.compute_dtype is torch.bfloat16
    assert cast.forward(x, cast.new_cache()).dtype is torch.bfloat16


def test_every_tensor_a_step_creates_is_made_on_the_spans_device(tiny_model_dir):
    """With the default device set to ``meta``, any tensor made without ``device=`` would be
    a meta tensor and the step would fail or return one: the prefill (masks), decode steps on
    both paths, a growing cache and the head all give the CPU results."""
    for family in ("llama", "mistral"):
        spec = resolve_model(tiny_model_dir(family))
        span, head = load_span(spec, 0, spec.num_blocks), load_head(spec)
        ids = torch.randint(3, spec.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        expected, cache = [], span.new_cache()
        x = head.embed(ids)
        expected.append(head.logits(span.forward(x, cache)))
        for t in range(8):
            expected.append(head.logits(span.forward(x[:, t : t + 1], cache)))
        with torch.device("meta"):
            assert torch.empty(1).device.type == "meta"  # the trap is armed
            got, cache = [], span.new_cache()
            x = head.embed(ids)
            got.append(head.logits(span.forward(x, cache)))
            for t in range(8):
                got.append(head.logits(span.forward(x[:, t : t + 1], cache)))
        assert all(g.device.type == "cpu" for g in got)
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


def test_a_nodes_step_answers_from_cpu_memory_in_the_documented_dtype(tiny_model_dir, tmp_path):
    """Through a real node on the memory transport: a float32 span answers float32 and
    float16 requests in kind, with what the span computes; a bfloat16 span answers in bf16."""
    from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery
    from layerchain.node import Node
    from layerchain.wire import MemoryNetwork, MemoryTransport, OpenSession, RpcClient, Step

    spec = resolve_model(tiny_model_dir("llama"))
    H, L = spec.hidden_size, spec.num_blocks
    x = torch.randn(1, 4, H, generator=torch.Generator().manual_seed(1))

    async def serve(span, requests):
        network, identity = MemoryNetwork(), Identity.generate()
        node = Node(
            NodeConfig(start=0, end=L, data_dir=tmp_path), spec=spec, span=span,
            transport=MemoryTransport(network), listen_at=f"mem://{identity.peer_id}",
            discovery=MemoryDiscovery(MemoryDHT(), identity), identity=identity,
        )
        await node.start()
        try:
            rpc = RpcClient(await MemoryTransport(network).connect(node.endpoint))
            replies = []
            for n, hidden in enumerate(requests):
                await rpc.call(OpenSession(0, f"s{n}", spec.model_id, 0, L, 16), 10)
                replies.append((await rpc.call(Step(0, f"s{n}", 0, hidden), 30)).hidden)
            return replies
        finally:
            await node.stop(drain_s=0)

    span = load_span(spec, 0, L)
    full, half = asyncio.run(serve(span, [x, x.half()]))
    assert full.dtype is torch.float32 and full.device.type == "cpu"
    assert torch.equal(full, span.forward(x, span.new_cache()))
    assert half.dtype is torch.float16
    assert torch.equal(half, span.forward(x.half().float(), span.new_cache()).half())
    cast = load_span(spec, 0, L).to(torch.bfloat16)
    (reply,) = asyncio.run(serve(cast, [x]))
    assert reply.dtype is torch.bfloat16
    assert torch.equal(reply, cast.forward(x, cast.new_cache()))


# ---------------------------------------------------------------- on a GPU, where there is one


def _gpu_checks(device: str, tiny_model_dir) -> None:
    spec = resolve_model(tiny_model_dir("llama", tokenizer=True))
    cpu_span, gpu_span = load_span(spec, 0, spec.num_blocks), load_span(spec, 0, spec.num_blocks, device=device)
    assert gpu_span.device.type == device
    assert all(t.device.type == device for t in (*gpu_span.parameters(), *gpu_span.buffers()))
    x = torch.randn(1, 6, spec.hidden_size)  # in CPU memory, as from the wire
    cache = gpu_span.new_cache(max_length=16)
    out = gpu_span.forward(x, cache)
    assert out.device.type == device and cache.nbytes > 0
    assert all(k is None or k.device.type == device for k in cache._keys)
    torch.testing.assert_close(out.cpu(), cpu_span.forward(x, cpu_span.new_cache()), rtol=1e-4, atol=1e-4)
    head = load_head(spec, device=device)
    assert head.embed(torch.tensor([[5, 6]])).device.type == device
    assert head.logits(out[:, -1:]).device.type == "cpu"  # where the sampler draws
    params = SamplingParams(max_new_tokens=8)
    on_gpu = LocalModel(spec, device=device).generate("Hello", params, raw=True)
    on_cpu = LocalModel(spec).generate("Hello", params, raw=True)
    assert on_gpu.token_ids == on_cpu.token_ids


@needs_cuda
def test_span_cache_and_head_on_cuda(tiny_model_dir):
    _gpu_checks("cuda", tiny_model_dir)


@needs_mps
def test_span_cache_and_head_on_mps(tiny_model_dir):
    _gpu_checks("mps", tiny_model_dir)


@without_cuda
def test_swarm_up_and_demo_refuse_an_absent_gpu_before_starting_anything(tmp_path):
    from layerchain.cli.main import app

    runner = CliRunner()
    for args in (["swarm", "up", "--state-dir", str(tmp_path / "swarm"), "--device", "cuda"],
                 ["demo", "--state-dir", str(tmp_path / "demo"), "--device", "cuda:0"]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0], result.stderr
    assert not (tmp_path / "swarm").exists() and not (tmp_path / "demo").exists()


def test_the_device_flag_reaches_the_node_config_and_the_launched_nodes(tmp_path, monkeypatch):
    """``node start --device`` builds NodeConfig(device=...); the local launcher passes
    ``--device`` to each node it starts (and nothing for the cpu default: old command lines)."""
    from layerchain.cli.main import app
    from layerchain.local import launcher
    from layerchain.node import runner
    from layerchain.types import Span

    seen = []

    async def fake_run_node(config, on_ready=None):
        seen.append(config)

    monkeypatch.setattr(runner, "run_node", fake_run_node)
    result = CliRunner().invoke(app, ["node", "start", "--new-swarm", "--blocks", "0:2", "--device", "auto",
                                      "--data-dir", str(tmp_path / "node")])
    assert result.exit_code == 0, result.output
    assert [c.device for c in seen] == ["auto"]

    commands = []
    monkeypatch.setattr(launcher, "_spawn", lambda cmd, log, env: commands.append(cmd))
    for device in ("cuda:1", "cpu"):
        launcher.start_node(tmp_path, "n", Span(0, 2), ["/ip4/127.0.0.1/tcp/1"], device=device)
    assert commands[0][-2:] == ["--device", "cuda:1"] and "--device" not in commands[1]
