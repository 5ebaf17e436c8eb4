"""The OpenAI HTTP API's shapes: requests parsed into typed records, responses, chunks, errors.

Pure functions, no I/O: the gateway (``app.py``) feeds them request bodies and generation
results. What is accepted:

* ``/v1/chat/completions``: ``messages`` (roles system, developer (= system), user,
  assistant; content a string or a list of ``{"type": "text", "text"}`` parts);
  ``/v1/completions``: ``prompt`` (a string, or a list of one string).
* Standard fields: ``model``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature``
  (0 = greedy; OpenAI's default 1 when absent), ``top_p``, ``stop`` (a string or up to 4),
  ``seed`` (absent: a random one, as OpenAI does), ``stream``, ``stream_options.include_usage``,
  ``user``, ``n`` (1 only). Other standard fields (``logprobs``, ``presence_penalty`` ...)
  are ignored rather than refused, so stock clients work.
* Extensions: routing ``alpha`` (0 fastest .. 1 cheapest), ``max_price`` (credits per
  token), ``max_latency_ms`` (per token); sampling ``top_k`` and ``repetition_penalty``.

Bounded work: every number is finite (``NaN``/``Infinity`` are refused while parsing) and in
range (``seed`` a signed 64-bit integer, ``max_tokens`` up to the gateway's limit, ``top_k``
and ``repetition_penalty`` capped), at most ``MAX_STOP`` stop strings of ``MAX_STOP_CHARS``
each, at most ``MAX_MESSAGES`` messages, ``model`` and ``user`` at most ``MAX_NAME_CHARS``.
The body's size is the gateway's check (``GatewayConfig.max_body_bytes``), the prompt's
length in tokens too (against the model's context).

A bad field raises ``ConfigError`` whose ``param`` attribute names the field; ``ApiError``
is what the gateway answers (status, OpenAI ``type`` and ``code``). ``api_error_for`` maps
an error of the request or of the generation: it never answers 401 or 402, which only the
gateway's own key checks give (``key_error``), so an error code a peer sent can never make
a caller believe its key or its credits were refused. Responses carry ``usage`` and, as an
extension, ``layerchain: {route, cost, tokens_per_s, ttft_s, recoveries}``.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from layerchain.errors import (
    ConfigError,
    InsufficientFunds,
    InvalidApiKey,
    LayerchainError,
    LedgerError,
    PaymentError,
    PeerError,
    ProtocolError,
    RoutingError,
    UnknownModel,
    UserError,
)
from layerchain.model.sampling import SamplingParams
from layerchain.routing import RouteLimits
from layerchain.types import Hop

Message = dict[str, str]
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256  # characters per stop string
MAX_MESSAGES = 1024  # messages per chat request
MAX_NAME_CHARS = 256  # characters of ``model`` and ``user``
MAX_TOP_K = 1 << 20  # above any vocabulary: top_k beyond the vocabulary means all tokens
MAX_REPETITION_PENALTY = 100.0  # divides or multiplies logits; more is no longer a penalty
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as OpenAI's seed
MAX_ERROR_CHARS = 300  # of a swarm's error message relayed to a caller (peers write them)


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class GenerationRequest:
    """One ``/v1/chat/completions`` or ``/v1/completions`` request, checked."""

    kind: str  # "chat" | "text"
    model: str | None  # as the caller named it; None = the gateway's model
    prompt: str | tuple[Message, ...]  # text (kind "text") or messages (kind "chat")
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage only
    user: str | None
    limits: RouteLimits  # the gateway's defaults with the request's own fields

    @property
    def raw(self) -> bool:
        """Completions take the prompt as is; chat goes through the chat template."""
        return self.kind == "text"


def bad(param: str | None, message: str) -> ConfigError:
    """A ConfigError naming the offending request field (OpenAI's ``param``)."""
    return ConfigError(message, param=param)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_body(body: bytes) -> dict[str, Any]:
    """The request's JSON object; ``NaN`` and ``Infinity`` (which Python's parser accepts
    and JSON does not) are refused, so every number that reaches a check is finite."""
    try:
        data = json.loads(body or b"null", parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise bad(None, f"the request body is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise bad(None, "the request body must be a JSON object")
    return data


def _number(data: dict, name: str, low: float | None = None, high: float | None = None,
            *, low_open: bool = False, integer: bool = False) -> Any:
    value = data.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(name, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise bad(name, f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise bad(name, f"{name} must be <= {high}, got {value}")
    return value


def _messages(data: dict) -> tuple[Message, ...]:
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("messages", "messages must be a non-empty list of {role, content}")
    if len(raw) > MAX_MESSAGES:
        raise bad("messages", f"messages takes at most {MAX_MESSAGES} messages, got {len(raw)}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = _ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {sorted(_ROLES)}, "
                      f"got {m.get('role')!r}")
        out.append({"role": role, "content": _content(m.get("content"), f"messages[{i}].content")})
    if not any(m["content"].strip() for m in out):
        raise bad("messages", "the messages are all empty")
    return tuple(out)


def _content(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(param, f"{param}: only text parts ({{type: text, text}}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(param, f"{param} must be a string or a list of text parts")


def _prompt(data: dict) -> str:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise bad("prompt", "prompt must be one string (batches of prompts are not supported)")
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt", "prompt must be a non-empty string")
    return prompt


def _stop(data: dict) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "stop must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"stop takes at most {MAX_STOP} strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad("stop", f"a stop string may have at most {MAX_STOP_CHARS} characters")
    return tuple(stop)


def _name(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(name, f"{name} must be a string")
    if value is not None and len(value) > MAX_NAME_CHARS:
        raise bad(name, f"{name} may have at most {MAX_NAME_CHARS} characters")
    return value


def parse_request(
    data: dict[str, Any], kind: str, *, default_max_tokens: int, max_tokens_limit: int,
    limits: RouteLimits = RouteLimits(),
) -> GenerationRequest:
    """Check a request body (already a dict) of ``kind`` "chat" or "text". ``limits`` are
    the gateway's defaults; the request's ``alpha``, ``max_price`` and ``max_latency_ms``
    replace them field by field."""
    model = _name(data, "model")
    prompt: str | tuple[Message, ...] = _messages(data) if kind == "chat" else _prompt(data)
    n = _number(data, "n", 1, 1, integer=True)
    if n not in (None, 1):
        raise bad("n", "n must be 1")
    max_tokens = _number(data, "max_completion_tokens", 1, max_tokens_limit, integer=True)
    if max_tokens is None:
        max_tokens = _number(data, "max_tokens", 1, max_tokens_limit, integer=True)
    temperature = _number(data, "temperature", 0, 2)
    top_p = _number(data, "top_p", 0, 1, low_open=True)
    seed = _number(data, "seed", *SEED_RANGE, integer=True)
    top_k = _number(data, "top_k", 0, MAX_TOP_K, integer=True)
    penalty = _number(data, "repetition_penalty", 0, MAX_REPETITION_PENALTY, low_open=True)
    stream = data.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", "stream must be true or false")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", "stream_options must be an object")
    user = _name(data, "user")
    params = SamplingParams(
        max_new_tokens=max_tokens or default_max_tokens,
        temperature=1.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=top_k or 0,
        repetition_penalty=1.0 if penalty is None else float(penalty),
        seed=secrets.randbelow(2**31) if seed is None else int(seed),
        stop=_stop(data),
    )
    given = {"alpha": _number(data, "alpha", 0, 1),
             "max_price": _number(data, "max_price", 0),
             "max_latency_ms": _number(data, "max_latency_ms", 0, low_open=True)}
    limits = replace(limits, **{k: float(v) for k, v in given.items() if v is not None})
    return GenerationRequest(
        kind=kind, model=model, prompt=prompt, params=params, stream=bool(stream),
        include_usage=bool(options.get("include_usage")), user=user, limits=limits,
    )


# ---------------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def route_json(route: tuple[Hop, ...] | list[Hop]) -> list[dict[str, Any]]:
    return [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in route]


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def extension_json(result: Any) -> dict[str, Any]:
    """The ``layerchain`` field: how the swarm served the request."""
    return {
        "route": route_json(result.route),
        "cost": int(getattr(result, "cost", 0)),  # credits the swarm charged (0 on a free swarm)
        "tokens_per_s": round(result.tokens_per_s, 3),
        "ttft_s": round(result.ttft_s, 3),
        "recoveries": len(result.recoveries),
    }


def completion_json(request_id: str, kind: str, model: str, created: int, result: Any) -> dict:
    """A whole answer: ``chat.completion`` or ``text_completion``."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                  "logprobs": None}
    return {
        "id": request_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_json(result.prompt_tokens, len(result.token_ids)),
        "layerchain": extension_json(result),
    }


def chunk_json(
    request_id: str, kind: str, model: str, created: int, *, text: str | None = None,
    first: bool = False, finish_reason: str | None = None,
) -> dict:
    """One streamed chunk with new text, or the last one with ``finish_reason``."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk_json(request_id: str, kind: str, model: str, created: int, result: Any) -> dict:
    """The last chunk asked for with ``stream_options.include_usage``: no choices, usage."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_json(result.prompt_tokens, len(result.token_ids)),
        "layerchain": extension_json(result),
    }


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def now() -> int:
    return int(time.time())


# ---------------------------------------------------------------------------- errors


class ApiError(Exception):
    """What the gateway answers for a failed request: an HTTP status and OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def key_error(error: InvalidApiKey | InsufficientFunds) -> ApiError:
    """The answer to the gateway's own key checks, the only source of 401 and 402: a
    missing, unknown or revoked key (401 ``invalid_api_key``), or a key whose credits do
    not cover the request (402 ``insufficient_balance``)."""
    if isinstance(error, InvalidApiKey):
        return ApiError(401, str(error), "invalid_request_error", "invalid_api_key")
    return ApiError(402, str(error), "insufficient_quota", "insufficient_balance")


def api_error_for(error: LayerchainError) -> ApiError:
    """The status and OpenAI error of an error of the request or of its generation.

    400 invalid request (a bad field, a prompt beyond the model's context ...), 404 unknown
    model, 503 no route, or the swarm (a peer, a payment, the gateway's own wallet or
    ledger) failed the request: retry later. Never 401 or 402: an ``InvalidApiKey`` or
    ``InsufficientFunds`` here came from the generation (a peer's error reply, or the
    gateway's wallet running dry), not from the caller's key, which ``key_error`` answers.
    The message is clipped to ``MAX_ERROR_CHARS``: peers write some of it.
    """
    message = _clip(str(error))
    param = error.param if isinstance(error, UserError) else None
    if isinstance(error, UnknownModel):
        return ApiError(404, message, "invalid_request_error", "model_not_found", param or "model")
    if isinstance(error, RoutingError):
        return ApiError(503, message, "server_error", error.code)
    if isinstance(error, (PaymentError, LedgerError, InvalidApiKey)):  # the swarm's, not the key's
        return ApiError(503, f"the swarm failed the request: {message}", "server_error", error.code)
    if isinstance(error, UserError):
        return ApiError(400, message, "invalid_request_error", error.code, param)
    if isinstance(error, (PeerError, ProtocolError)):
        return ApiError(503, f"the swarm failed the request: {message}", "server_error", error.code)
    return ApiError(500, message, "server_error", error.code)


def _clip(message: str) -> str:
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - 1] + "…"
