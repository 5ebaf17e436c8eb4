"""CLI: `layerchain bench` — measurements printed as JSON, never asserted in timed tests.

`layerchain bench [--nodes 3] [--json]` compares one process with a local swarm;
`layerchain bench routing` times the route planner over random swarms;
`layerchain bench faults` kills hops mid-generation; `layerchain bench gateway` compares a
direct client with the HTTP gateway; `layerchain bench hostile` runs the attacks of issue 12; `layerchain bench verify` runs
audits against cheating nodes (issue 14); `layerchain bench compute` times the whole model per
weight form (--dtype) against llama.cpp; `layerchain bench step` shows where a decode step's
time goes through a span (matmuls, attention, dispatch; the plain and the lean path);
`layerchain bench fetch` fetches a span's files from 1 and from 3 seeding peers;
`layerchain bench train` fine-tunes through a local swarm and in one process;
`layerchain bench compression` weighs the wire forms of hidden states (bytes, greedy agreement).
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from layerchain.model.spec import DEFAULT_MODEL

bench_app = typer.Typer(help="Measure layerchain; prints JSON with --json.", invoke_without_command=True)


@bench_app.callback()
def bench_swarm(
    ctx: typer.Context,
    nodes: int = typer.Option(3, help="Nodes in the local swarm."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    max_new_tokens: int = typer.Option(64, help="Tokens decoded in each run."),
    threads: int = typer.Option(0, help="Torch threads for every process (0 = the cores "
                                "shared by the nodes and the client, at least 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext tcp:// links instead of TLS (to compare)."),
    concurrency: str = typer.Option(
        "", help="Concurrent streams to measure, e.g. 1,2,4,8 (one swarm for all points)."),
    batch_window_ms: float = typer.Option(
        -1.0, help="With --concurrency: the nodes' --batch-window-ms (0 = no batching, to "
        "compare; -1 = the node's default)."),
) -> None:
    """Single process vs a local swarm: single_process_tps, swarm_tps, ratio, hop overhead,
    and each decode token split into node compute, client compute and wire per hop. With
    --concurrency N,M,..: N concurrent greedy streams per point on one swarm, points
    [{concurrency, aggregate_tokens_per_s, ttft_s_p50/p99, itl_ms_p50/p99}]."""
    if ctx.invoked_subcommand is not None:
        return
    if concurrency:
        from layerchain.bench.concurrency import parse_levels, run_concurrency_bench

        try:
            levels = parse_levels(concurrency)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--concurrency") from None
        _print(run_concurrency_bench(levels, model=model, nodes=nodes,
                                     max_new_tokens=max_new_tokens, threads=threads or None,
                                     insecure=insecure,
                                     batch_window_ms=None if batch_window_ms < 0 else batch_window_ms),
               as_json)
        return
    from layerchain.bench.swarm import run_swarm_bench

    result = run_swarm_bench(model=model, nodes=nodes, max_new_tokens=max_new_tokens,
                             threads=threads or None, insecure=insecure)
    _print(result, as_json)


def _print(result: dict, as_json: bool) -> None:
    typer.echo(json.dumps(result) if as_json else "\n".join(f"{k}: {v}" for k, v in result.items()))


@bench_app.command("routing")
def bench_routing(
    peers: int = typer.Option(10_000, help="Peers in each random swarm."),
    blocks: int = typer.Option(80, help="Blocks of the model."),
    trials: int = typer.Option(20, help="Random swarms to plan over."),
    seed: int = typer.Option(0, help="Seed of the first random swarm."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Time route planning over random swarms in every case (alpha 0, 0.5, 1; binding
    price, latency, both): plan_ms_p50 / plan_ms_p99 each, in "cases"."""
    from layerchain.bench.routing import run_routing_cases

    result = run_routing_cases(peers=peers, blocks=blocks, trials=trials, seed=seed)
    _print(result, as_json)


@bench_app.command("faults")
def bench_faults(
    runs: int = typer.Option(10, help="Generations, each with one hop killed mid-way."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    spans: str = typer.Option("0:15,15:30,0:15,15:30,0:15,15:30", help="Spans of the nodes."),
    max_new_tokens: int = typer.Option(24, help="Tokens per generation."),
    seed: int = typer.Option(0, help="Seed of the kill schedule."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """kill -9 a hop mid-generation, many times: runs, completed, identical, recovery_s."""
    from layerchain.bench.faults import run_faults_bench

    _print(run_faults_bench(runs=runs, model=model, spans=spans,
                            max_new_tokens=max_new_tokens, seed=seed), as_json)


@bench_app.command("gateway")
def bench_gateway(
    nodes: int = typer.Option(3, help="Nodes in the local swarm."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    max_new_tokens: int = typer.Option(32, help="Tokens per request."),
    concurrency: int = typer.Option(4, help="Requests at once in the last run."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Direct client vs the HTTP gateway on one swarm: tokens/s, ttft, concurrent tokens/s."""
    from layerchain.bench.gateway import run_gateway_bench

    _print(run_gateway_bench(model=model, nodes=nodes, max_new_tokens=max_new_tokens,
                             concurrency=concurrency), as_json)


@bench_app.command("hostile")
def bench_hostile(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    quick: bool = typer.Option(False, "--quick", help="Shorter attacks and a shorter long prompt."),
    attacks: str = typer.Option("", help="Comma-separated attack names (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Each attack class of issue 12 against a local swarm while an honest client generates:
    attacks [{name, blocked, honest_tokens_per_s_ratio, ...}], all_blocked."""
    from layerchain.bench.hostile import run_hostile_bench

    names = [a.strip() for a in attacks.split(",") if a.strip()] or None
    _print(run_hostile_bench(model=model, quick=quick, attacks=names), as_json)


@bench_app.command("verify")
def bench_verify(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    audit_rate: Optional[float] = typer.Option(
        None, help="Audit rate of the clients (default: the client's default)."),
    runs: int = typer.Option(20, help="Generations against each cheating mode."),
    max_new_tokens: int = typer.Option(64, help="Tokens per generation."),
    honest_steps: int = typer.Option(10_000, help="Audited hop steps of honest nodes to reach."),
    modes: str = typer.Option("", help="Comma-separated misbehave modes (default: all)."),
    quick: bool = typer.Option(False, "--quick", help="2 runs per mode, 200 honest steps, 16 tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Audits against each cheating mode and against honest nodes, in an in-process memory
    swarm with real weights: modes [{mode, runs, detected, tokens_to_detect_p50}],
    honest_audited_steps, false_positives, commitment_bytes_per_token, overhead_ratio."""
    from layerchain.bench.verify import run_verify_bench

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip()) or None
    if quick:
        runs, max_new_tokens, honest_steps = 2, 16, 200
    _print(run_verify_bench(
        model=model, audit_rate=audit_rate, runs=runs, max_new_tokens=max_new_tokens,
        sometimes_tokens=4 * max_new_tokens, honest_steps=honest_steps, modes=chosen,
        overhead_runs=1 if quick else 4, progress=lambda line: typer.echo(line, err=True),
    ), as_json)


@bench_app.command("rtt")
def bench_rtt(
    rtt_ms: str = typer.Option("0,5,25,50,100", help="Round trips between hosts to measure, ms."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    max_new_tokens: int = typer.Option(32, help="Tokens per generation."),
    runs: int = typer.Option(2, help="Generations per round trip (after one warm-up)."),
    threads: int = typer.Option(1, help="Torch threads of each node."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """3 hops on emulated hosts (network namespaces; needs root) with RTT_MS between every
    pair, TLS on: points [{rtt_ms, tokens_per_s, ttft_s, measured_rtt_ms}]."""
    from layerchain.bench.rtt import parse_rtts, run_rtt_bench

    _print(run_rtt_bench(parse_rtts(rtt_ms), model=model, max_new_tokens=max_new_tokens,
                         runs=runs, threads=threads,
                         on_progress=None if as_json else typer.echo), as_json)


@bench_app.command("wire")
def bench_wire(
    iterations: int = typer.Option(2000, help="Round trips measured on each transport."),
    tokens: int = typer.Option(1, help="Tokens per Step (1: a decode step; up to 512)."),
    mode: str = typer.Option("rpc", help="rpc (RpcClient + serve_connection) or raw (send/recv)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """One hop's wire overhead on loopback, plaintext TCP and TLS side by side in one run:
    p50_us... (TCP), tls_p50_us..., tls_added_p50_us."""
    from layerchain.bench.wire import side_by_side
    from layerchain.errors import ConfigError

    if mode not in ("rpc", "raw") or not 1 <= tokens <= 512 or iterations < 1:
        raise ConfigError("bench wire needs --mode rpc|raw, --tokens 1..512, --iterations >= 1")
    _print(side_by_side(iterations=iterations, tokens=tokens, mode=mode), as_json)


@bench_app.command("floor")
def bench_floor(
    tokens: int = typer.Option(64, help="Tokens per round."),
    rounds: int = typer.Option(2, help="Rounds of pull then push."),
    node_mb: float = typer.Option(142.0, help="MB of float32 weights each node streams per step "
                                              "(142: SmolLM2's 10 fp32 blocks)."),
    head_mb: float = typer.Option(113.0, help="MB the client streams per token (its LM head)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The floor of a hop on this machine: 3 node processes and a client over bare loopback
    sockets (no asyncio, TLS, codec or signatures), pull and push: points [{mode,
    wire_ms_per_hop_p50, ...}]."""
    from layerchain.bench.floor import run_floor_bench

    _print(run_floor_bench(tokens=tokens, rounds=rounds, node_mb=node_mb, head_mb=head_mb),
           as_json)


@bench_app.command("startup")
def bench_startup(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    nodes: int = typer.Option(3, help="Nodes in the local swarm."),
    runs: int = typer.Option(3, help="Timed one-shot generates (after one warm-up)."),
    threads: int = typer.Option(0, help="Torch threads of each node (0 = torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """A fresh `layerchain generate --max-new-tokens 1` against a local swarm, phase by
    phase (medians): import_s, dht_join_s, head_load_s, first_token_s, total_s."""
    from layerchain.bench.startup import run_startup_bench
    from layerchain.errors import ConfigError

    if nodes < 1 or runs < 1:
        raise ConfigError("bench startup needs --nodes >= 1 and --runs >= 1")
    _print(run_startup_bench(model=model, nodes=nodes, runs=runs, threads=threads or None),
           as_json)


@bench_app.command("memory")
def bench_memory(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    blocks: str = typer.Option("3,10", help="Comma-separated block counts, one node each."),
    dtypes: str = typer.Option("fp32", help="Comma-separated weight forms, one node each (model.dtypes: fp32, int8, ...)."),
    threads: int = typer.Option(0, help="Torch threads of each node (0 = torch's default)."),
    serving: bool = typer.Option(True, "--serving/--no-serving", help="Read each node again after a short session through it (a second node serves the other blocks)."),
    cold_cache: bool = typer.Option(False, "--cold-cache", help="Start each node with a fresh LAYERCHAIN_HOME (a first start on a machine: it builds the manifest)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """PSS of a real node's processes serving N blocks, minus its weights (issue 21): rows
    [{blocks, dtype, pss_mb_total, pss_mb_by_process, weights_mb, overhead_mb, ...,
    serving: {...}}]."""
    from layerchain.bench.memory import run_memory_bench
    from layerchain.errors import ConfigError

    try:
        counts = tuple(int(b) for b in blocks.split(",") if b.strip())
    except ValueError:
        counts = ()
    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    if not counts or min(counts) < 1 or not names:
        raise ConfigError("bench memory needs --blocks N[,N...] (each >= 1) and --dtypes NAME[,NAME...]")
    _print(run_memory_bench(model=model, blocks=counts, dtypes=names, threads=threads or None,
                            serving=serving, cold_cache=cold_cache), as_json)


@bench_app.command("compute")
def bench_compute(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    dtypes: str = typer.Option(
        "fp32,bf16,int8,int4", help="Comma-separated weight forms to time (model.quant.DTYPES)."
    ),
    threads: str = typer.Option("1", help="Comma-separated torch/llama.cpp thread counts, e.g. 1,2."),
    tokens: int = typer.Option(32, help="Decode steps timed per run."),
    repeats: int = typer.Option(3, help="Runs per row; the best is kept (a shared machine)."),
    agreement: bool = typer.Option(
        True, "--agreement/--no-agreement", help="Also score each form's greedy agreement with fp32."
    ),
    baseline: bool = typer.Option(
        False, "--baseline", help="Also time each form without the native decode path "
        "(rows 'layerchain-python') and int4/int8 without the fused kernels and the rescored "
        "head (rows 'layerchain-unfused'), alternating with the form's own runs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The whole model decoding in one process per weight form, and llama.cpp on the same
    GGUF when llama-cpp-python is installed: rows [{runtime, dtype, ms_per_token,
    tokens_per_s, weights_mb, ...}], ratio_vs_llamacpp (best ours / llama.cpp)."""
    from layerchain.bench.compute import bench_compute as run
    from layerchain.errors import ConfigError

    try:
        counts = tuple(int(t) for t in threads.split(",") if t.strip())
    except ValueError:
        counts = ()
    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    if not counts or min(counts) < 1 or not names or tokens < 1 or repeats < 1:
        raise ConfigError(
            "bench compute needs --threads N[,N...] (each >= 1), --dtypes NAME[,NAME...], "
            "--tokens >= 1 and --repeats >= 1"
        )
    _print(run(model=model, dtypes=names, threads=counts, tokens=tokens, repeats=repeats,
               agreement=agreement, baseline=baseline), as_json)


@bench_app.command("step")
def bench_step(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    blocks: int = typer.Option(10, help="Blocks in the span (from block 0)."),
    context: int = typer.Option(128, help="Tokens already in the KV cache at each step."),
    steps: int = typer.Option(20, help="Steps per round and path."),
    rounds: int = typer.Option(10, help="Rounds, alternating the plain and the lean path."),
    threads: int = typer.Option(1, help="Torch threads (0 = torch's default)."),
    device: str = typer.Option("cpu", help="cpu, cuda (cuda:N), mps or auto."),
    compile: bool = typer.Option(
        False, "--compile", help="Also time torch.compile of each block's MLP and norms "
        "(minutes of compilation on a small CPU)."),
    batch: str = typer.Option("", help="Also time decode steps of B sessions as one forward, "
                              "for each B of a comma-separated list (e.g. 1,2,4,8)."),
    dtype: str = typer.Option("fp32", help="Form of the span's weights (fp32, bf16, fp16, "
                              "int8, int4, auto)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Where a one-token decode step through a span goes: ms_per_step_p50, before_ms /
    after_ms (the layers' own forward vs the lean decode path, side by side), matmul_share,
    node_extras_ms (commitment, receipt, codec), compile figures with --compile, and with
    --batch ms per step and per token of B sessions batched (node.batching)."""
    from layerchain.bench.step import run_step_bench
    from layerchain.errors import ConfigError

    if blocks < 1 or context < 1 or steps < 1 or rounds < 1 or threads < 0:
        raise ConfigError("bench step needs --blocks, --context, --steps, --rounds >= 1 and "
                          "--threads >= 0")
    try:
        sizes = tuple(int(b) for b in batch.split(",") if b.strip())
    except ValueError:
        raise ConfigError(f"--batch takes batch sizes like 1,2,4,8, not {batch!r}") from None
    if any(b < 1 or b > 256 for b in sizes):
        raise ConfigError("--batch sizes must be in 1..256")
    _print(run_step_bench(model, blocks=blocks, context=context, steps=steps, rounds=rounds,
                          threads=threads, device=device, compile=compile, batch=sizes,
                          dtype=dtype),
           as_json)


@bench_app.command("fetch")
def bench_fetch(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference (the seeders serve it)."),
    blocks: str = typer.Option("10:20", help="Blocks whose files are fetched, START:END."),
    seeders: int = typer.Option(3, help="Seeding nodes in the local swarm (each: every block)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """A span's files fetched from 1 and from all seeders over loopback (issue 20.3):
    bytes, seconds, mb_per_s, peers (of the run from the most peers) and every run."""
    from layerchain.bench.fetch import run_fetch_bench
    from layerchain.errors import ConfigError
    from layerchain.types import Span

    if seeders < 1:
        raise ConfigError("bench fetch needs --seeders >= 1")
    counts = (1, seeders) if seeders > 1 else (1,)
    _print(run_fetch_bench(model, Span.parse(blocks), seeders, counts), as_json)


@bench_app.command("train")
def bench_train(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    nodes: int = typer.Option(3, help="Node processes splitting the blocks evenly."),
    steps: int = typer.Option(3, help="Timed optimizer steps (after one warm-up step)."),
    method: str = typer.Option("prompt", help="prompt (backward through every hop) or lora."),
    batch_size: int = typer.Option(2, help="Examples per step."),
    dp: bool = typer.Option(True, "--dp/--no-dp", help="Also measure dp_speedup_2_peers."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Fine-tuning through a local swarm vs one process (issue 18): finetune_tokens_per_s,
    finetune_local_tokens_per_s, ratio, dp_speedup_2_peers, and where the time goes."""
    from layerchain.bench.train import run_train_bench
    from layerchain.errors import ConfigError

    if nodes < 1 or steps < 1 or batch_size < 1:
        raise ConfigError("bench train needs --nodes, --steps and --batch-size >= 1")
    _print(run_train_bench(model, nodes=nodes, steps=steps, method=method,
                           batch_size=batch_size, dp=dp,
                           on_progress=lambda line: typer.echo(line, err=True)), as_json)


@bench_app.command("compression")
def bench_compression(
    model: str = typer.Option(DEFAULT_MODEL, help="Model reference."),
    wires: str = typer.Option("fp32,fp16,bf16,int8", help="Comma-separated wire forms."),
    hops: int = typer.Option(3, help="Hops the model's blocks are split into."),
    tokens: int = typer.Option(32, help="Greedy fp32 tokens scored per prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Activation compression on the wire (--wire): rows [{wire, bytes_per_token (a decode
    step's Step + StepResult frames on one hop), ratio_vs_fp32, agreement (teacher-forced
    greedy tokens vs fp32, hops chained in one process through the wire transform),
    max_commitment_distance}]."""
    from layerchain.bench.compression import WIRES, run_compression_bench
    from layerchain.errors import ConfigError

    names = tuple(w.strip() for w in wires.split(",") if w.strip())
    if not names or set(names) - set(WIRES) or hops < 1 or tokens < 1:
        raise ConfigError(f"bench compression needs --wires among {','.join(WIRES)}, "
                          "--hops >= 1 and --tokens >= 1")
    _print(run_compression_bench(model, names, hops=hops, tokens=tokens), as_json)


def register(app: typer.Typer) -> None:
    """Add `bench` to the app."""
    app.add_typer(bench_app, name="bench")

