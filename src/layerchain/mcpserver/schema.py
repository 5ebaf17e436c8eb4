"""The MCP tools' input schemas: one pydantic model per tool, seed 003's names and fields.

Seed 003 gives each tool's ``inputSchema``; these models keep its property names, types and
enums and add the few options a real call needs (``max_tokens``, ``steps`` ...), each with
a default, so a call with seed 003's fields alone works. The SDK shows
``model_json_schema(by_alias=True)`` as the tool's ``inputSchema`` and validates a call's
arguments with the model before the tool runs (``server.one_line`` makes a validation
failure one line). ``llm_train_distributed``'s ``model_config`` is pydantic's own attribute
name, so its field is ``settings`` under that alias: which is why these models are written
out instead of derived from the tools' signatures.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.fastmcp.utilities.func_metadata import ArgModelBase
from pydantic import Field, WithJsonSchema

ShardStrategy = Literal["round_robin", "hash", "random"]  # train.sharding.STRATEGIES (tested)
# an integer option whose absence means "the default": shown as seed 003's plain integer
Count = Annotated[int | None, WithJsonSchema({"type": "integer", "minimum": 1})]


class InferenceArguments(ArgModelBase):
    """``llm_inference_distributed``."""

    prompt: str = Field(description="The text to answer (a user message, through the model's "
                        "chat template unless raw).")
    model_name: str = Field("", description="The model to run: a name or model id that "
                            "llm://models lists; empty: the server's model.")
    parallelism: Literal["model", "tensor", "pipeline", "hybrid"] = Field(
        "pipeline", description="How the model is split over nodes: 'pipeline' (or 'model', "
        "the same here) routes the hidden states through spans of blocks on different "
        "peers; 'tensor' and 'hybrid' are not supported.")
    nodes: list[str] = Field(default_factory=list, description="Peer ids (llm://nodes) the "
                             "route may use; empty: any peer.")
    max_tokens: Count = Field(None, ge=1, description="Tokens to generate at most "
                                   "(default: the server's).")
    temperature: float = Field(0.0, ge=0, description="0: greedy (the same answer every time).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int = Field(0, description="Sampling seed (with a temperature > 0).")
    stop: list[str] = Field(default_factory=list, description="Strings that end the answer.")
    raw: bool = Field(False, description="Send the prompt as is, without the chat template.")


class TrainArguments(ArgModelBase):
    """``llm_train_distributed``."""

    training_data: str = Field(description="The training data: a JSONL file's path or file:// "
                               "URI, one {\"text\": ...} or {\"messages\": [...]} per line.")
    settings: dict[str, Any] = Field(
        default_factory=dict, alias="model_config",
        description="{\"model\": a model name (default: the swarm's), \"method\": \"prompt\" "
        "(prompt tuning, default) or \"lora\", \"lr\": learning rate; fine-tuning only: "
        "\"lora_rank\", \"virtual_tokens\"}.")
    parallelism: Literal["data", "model", "federated", "hybrid"] = Field(
        "model", description="'model': fine-tune through the swarm's spans (train finetune); "
        "'data': data-parallel over the DHT (train dp); 'federated': federated averaging "
        "rounds; 'hybrid' is not supported.")
    nodes: list[str] = Field(default_factory=list, description="Not supported: a job runs on "
                             "the swarm it joins.")
    epochs: Count = Field(None, ge=1, description="Passes over the data (fine-tuning: "
                               "turned into steps when steps is not given).")
    batch_size: Count = Field(None, ge=1, description="Samples per step (data-parallel: "
                                   "the target batch size).")
    steps: Count = Field(None, ge=1, description="Optimizer steps (fine-tuning).")
    shard_strategy: ShardStrategy = Field("round_robin", description="How a data-parallel "
                                          "job deals samples to peers.")
    out: str = Field("", description="Output directory (default: one per job under the "
                     "layerchain home).")


class ShardArguments(ArgModelBase):
    """``llm_data_shard``."""

    data_uri: str = Field(description="A JSONL file's path or file:// URI.")
    shard_strategy: ShardStrategy = Field("round_robin", description="round_robin and random "
                                          "balance sizes; hash keeps each record's shard "
                                          "whatever the order of the file.")
    nodes: list[str] = Field(default_factory=list, description="One shard per node, in this "
                             "order; empty: num_shards unnamed shards.")
    num_shards: Count = Field(None, ge=1, description="Shards when no nodes are named "
                                   "(default 2).")
    seed: int = Field(0, description="Seed of the random and hash strategies.")
