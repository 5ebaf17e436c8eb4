"""What an MCP tool call asks for, checked: pure functions from tool arguments to records.

The tools' names and arguments are seed 003's (``llm_inference_distributed``,
``llm_train_distributed``, ``llm_data_shard``); this module turns their loose JSON
arguments into frozen requests and says, as one ``ConfigError`` line, what is wrong with
them. It starts nothing and reads no network: ``shard_data`` reads the data file, nothing
else does I/O. ``server.py`` registers the tools, ``swarms.py`` and ``training.py`` run them.

Parallelism (seed 003's words, what layerchain does with them):

* inference ``model`` / ``pipeline``: the model's blocks are split into spans served by
  different peers and the hidden states go through them in turn (one route, the client's
  planner). Both mean the same here.
* inference ``tensor`` / ``hybrid``: splitting one block's matrices across peers; not
  built: a tool error says so.
* training ``model``: fine-tuning through the swarm (``layerchain train finetune``: the
  client holds the trainable parameters, peers run forward and backward through their
  frozen blocks); ``data``: data-parallel (``layerchain train dp``); ``federated``:
  federated averaging rounds (``train dp --parallelism federated``); ``hybrid``: not built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from layerchain.errors import ConfigError
from layerchain.model import SamplingParams

INFERENCE_PARALLELISMS = ("model", "tensor", "pipeline", "hybrid")  # seed 003's enum
ROUTED_PARALLELISMS = ("model", "pipeline")  # what layerchain runs: spans of blocks in a route
TRAIN_PARALLELISMS = ("data", "model", "federated", "hybrid")  # seed 003's enum
TRAIN_METHODS = ("prompt", "lora")  # fine-tuning: trainable prefix embeddings or LoRA
# what llm_train_distributed's model_config may hold -> the flag it becomes; the last three
# only for fine-tuning (parallelism "model")
MODEL_CONFIG_KEYS = ("model", "method", "lr", "lora_rank", "virtual_tokens")
FINETUNE_ONLY = {"lora_rank": "--lora-rank", "virtual_tokens": "--virtual-tokens"}


@dataclass(frozen=True)
class InferenceRequest:
    """One ``llm_inference_distributed`` call, checked."""

    prompt: str
    model: str | None  # a model reference or name; None: the server's model
    params: SamplingParams
    nodes: tuple[str, ...]  # peer ids (or endpoints) the route may use; (): any peer
    raw: bool  # the prompt as is, without the chat template


def check_parallelism(parallelism: str) -> None:
    """ConfigError unless ``parallelism`` is one layerchain runs (``ROUTED_PARALLELISMS``):
    "tensor" and "hybrid" are known but not built, anything else is unknown."""
    if parallelism in ROUTED_PARALLELISMS:
        return
    if parallelism in INFERENCE_PARALLELISMS:
        raise ConfigError(
            f"parallelism {parallelism!r} is not supported: layerchain splits a model into "
            "spans of blocks served by different peers, not one block's tensors",
            hint="use parallelism 'pipeline' (or 'model', the same here)",
        )
    raise ConfigError(f"unknown parallelism {parallelism!r}",
                      hint=f"use one of {', '.join(ROUTED_PARALLELISMS)}")


def inference_request(
    prompt: str,
    *,
    model_name: str | None,
    parallelism: str,
    nodes: Sequence[str] | None,
    max_tokens: int,
    max_tokens_limit: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] | None = None,
    raw: bool = False,
) -> InferenceRequest:
    """The checked request of an inference call (ConfigError naming the bad argument)."""
    check_parallelism(parallelism)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("the prompt is empty", hint="pass the text to complete as 'prompt'")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) \
            or not 1 <= max_tokens <= max_tokens_limit:
        raise ConfigError(f"max_tokens must be an integer in 1..{max_tokens_limit}, "
                          f"got {max_tokens!r}")
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, stop=tuple(stop or ()))
    return InferenceRequest(prompt=prompt, model=model_name or None, params=params,
                            nodes=_names(nodes, "nodes"), raw=raw)


def _names(values: Sequence[str] | None, what: str) -> tuple[str, ...]:
    names = tuple(values or ())
    if any(not isinstance(v, str) or not v for v in names):
        raise ConfigError(f"{what} must be a list of non-empty strings, got {list(names)!r}")
    return names


def data_path(uri: str) -> Path:
    """The local file a data URI names: a path or a ``file://`` URI; ConfigError for another
    scheme or a file that does not exist."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError("no data file given", hint="pass a JSONL file's path or file:// URI")
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"a file:// URI on another host is not supported: {uri}")
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, a path
        raise ConfigError(f"data URI scheme {parsed.scheme!r} is not supported: {uri}",
                          hint="copy the data to this machine and pass its path")
    else:
        path = Path(uri)
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"no data file at {path}", hint="pass an existing JSONL file")
    return path


@dataclass(frozen=True)
class ShardAssignment:
    """A data file's records dealt to shards (``train.sharding.assign``)."""

    data: str  # the file, as a path
    strategy: str  # one of train.sharding.STRATEGIES
    seed: int
    nodes: tuple[str, ...]  # the node each shard is for, in shard order; () when unnamed
    shards: tuple[tuple[int, ...], ...]  # record indices (0-based lines with a record) per shard

    @property
    def num_records(self) -> int:
        return sum(len(s) for s in self.shards)

    def to_json(self, with_indices: bool = True) -> dict[str, Any]:
        rows = []
        for i, shard in enumerate(self.shards):
            row: dict[str, Any] = {"shard": i, "node": self.nodes[i] if self.nodes else None,
                                   "size": len(shard)}
            if with_indices:
                row["indices"] = list(shard)
            rows.append(row)
        return {"data_uri": self.data, "shard_strategy": self.strategy, "seed": self.seed,
                "num_records": self.num_records, "num_shards": len(self.shards),
                "sizes": [len(s) for s in self.shards], "shards": rows}


def shard_data(
    uri: str, strategy: str, nodes: Sequence[str] | None, num_shards: int | None, seed: int = 0
) -> ShardAssignment:
    """Deal the records of the JSONL file ``uri`` to one shard per node (or ``num_shards``
    shards when no nodes are named) by ``strategy``; ConfigError for a missing or malformed
    file, an unknown strategy or a shard count that contradicts the nodes."""
    from layerchain.train.data import read_records, record_key
    from layerchain.train.sharding import STRATEGIES, assign

    if strategy not in STRATEGIES:  # before the file is read: the cheaper error first
        raise ConfigError(f"unknown shard strategy {strategy!r}",
                          hint=f"use one of {', '.join(STRATEGIES)}")
    names = _names(nodes, "nodes")
    if len(set(names)) != len(names):
        raise ConfigError("nodes names a node twice; list each node once")
    if names and num_shards is not None and num_shards != len(names):
        raise ConfigError(f"num_shards is {num_shards} but {len(names)} nodes are named",
                          hint="give one of them: one shard goes to each node")
    count = len(names) if names else (num_shards if num_shards is not None else 2)
    path = data_path(uri)
    keys = [record_key(r) for r in read_records(path)]
    shards = assign(keys, count, strategy, seed)
    return ShardAssignment(data=str(path), strategy=strategy, seed=seed, nodes=names,
                           shards=tuple(tuple(s) for s in shards))


@dataclass(frozen=True)
class TrainRequest:
    """One ``llm_train_distributed`` call, checked: which ``layerchain train`` command runs."""

    kind: str  # the job kind (train.jobs.KINDS): "finetune", "dp" or "federated"
    data: Path
    out: Path | None  # fine-tuning: the adapter's directory; data-parallel: the checkpoints'
    # (None: the command's default)
    model: str | None  # None: the command's default model
    method: str  # fine-tuning: one of TRAIN_METHODS
    steps: int  # optimizer steps of the run
    batch_size: int | None  # samples per step: dp's target batch size
    shard_strategy: str  # data-parallel: how samples are dealt to peers
    lr: float | None = None  # learning rate (None: the command's)
    options: tuple[tuple[str, int], ...] = ()  # fine-tuning's (flag, value) of FINETUNE_ONLY


def train_request(
    *,
    training_data: str,
    parallelism: str,
    model_config: Mapping[str, Any] | None,
    nodes: Sequence[str] | None,
    epochs: int | None,
    batch_size: int | None,
    steps: int | None,
    shard_strategy: str,
    out: Path | None,
    num_records: int,
) -> TrainRequest:
    """The checked request; ``num_records`` (records in the data file) turns ``epochs`` into
    steps when no ``steps`` are given: ``ceil(epochs * num_records / batch_size)``."""
    from layerchain.train.sharding import STRATEGIES

    if parallelism == "hybrid":
        raise ConfigError("parallelism 'hybrid' is not supported for training",
                          hint="use 'model' (fine-tune through the swarm), 'data' or 'federated'")
    if parallelism not in TRAIN_PARALLELISMS:
        raise ConfigError(f"unknown training parallelism {parallelism!r}",
                          hint="use one of model, data, federated")
    if nodes:
        raise ConfigError("choosing the nodes of a training job is not supported: the job "
                          "runs on the swarm it joins", hint="leave out 'nodes'")
    config = dict(model_config or {})
    unknown = sorted(set(config) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"model_config has unknown keys {unknown}",
                          hint=f"it may hold {', '.join(MODEL_CONFIG_KEYS)}")
    model = config.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError(f"model_config.model must be a model name, got {model!r}")
    method = config.get("method", "prompt")
    if method not in TRAIN_METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}",
                          hint=f"use one of {', '.join(TRAIN_METHODS)}")
    lr = config.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                           or not 0 < lr < math.inf):
        raise ConfigError(f"model_config.lr must be a learning rate > 0, got {lr!r}")
    options = []
    for key, flag in FINETUNE_ONLY.items():
        if key in config:
            value = config[key]
            if parallelism != "model":
                raise ConfigError(f"model_config.{key} is for fine-tuning only",
                                  hint="use it with parallelism 'model'")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model_config.{key} must be a positive integer, got {value!r}")
            options.append((flag, value))
    if shard_strategy not in STRATEGIES:
        raise ConfigError(f"unknown shard strategy {shard_strategy!r}",
                          hint=f"use one of {', '.join(STRATEGIES)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("steps", steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if steps is None:
        steps = math.ceil((epochs or 1) * num_records / (batch_size or 1))
    kind = {"model": "finetune", "data": "dp", "federated": "federated"}[parallelism]
    return TrainRequest(kind=kind, data=Path(training_data), out=out, model=model,
                        method=method, steps=steps, batch_size=batch_size,
                        shard_strategy=shard_strategy,
                        lr=None if lr is None else float(lr), options=tuple(options))


def train_command(request: TrainRequest, initial_peers: Sequence[str],
                  insecure: bool = False) -> list[str]:
    """The ``layerchain`` arguments that run ``request`` (issue 18's flags), ``--json``
    last; the program (``McpConfig.train_program``) goes before them."""
    peers = [arg for peer in initial_peers for arg in ("--initial-peers", peer)]
    model = ["--model", request.model] if request.model else []
    if request.kind == "finetune":
        if request.out is None:
            raise ConfigError("a fine-tuning job needs an output directory")
        args = ["train", "finetune", *peers, "--data", str(request.data),
                "--method", request.method, "--steps", str(request.steps),
                "--out", str(request.out), *model]
        if request.batch_size is not None:
            args += ["--batch-size", str(request.batch_size)]
        for flag, value in request.options:
            args += [flag, str(value)]
        if insecure:  # its links to the peers; dp only uses the DHT
            args.append("--insecure")
    else:
        args = ["train", "dp", *peers, "--data", str(request.data),
                "--shard-strategy", request.shard_strategy, "--steps", str(request.steps),
                *model]
        if request.batch_size is not None:
            args += ["--target-batch-size", str(request.batch_size)]
        if request.out is not None:
            args += ["--checkpoint-dir", str(request.out)]
        if request.kind == "federated":
            args += ["--parallelism", "federated"]
    if request.lr is not None:
        args += ["--lr", repr(request.lr)]
    return [*args, "--json"]
