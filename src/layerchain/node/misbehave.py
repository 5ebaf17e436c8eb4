"""Cheating on purpose: a node that returns wrong hidden states, for testing the defences.

``layerchain node start --misbehave MODE`` (``NodeConfig.misbehave``) makes a node cheat
in one of ``MODES``; it still signs a receipt for every step, committing to exactly what it
returned (``market.commitment``), so its receipts and commitments pass every cheap check:
only an audit (a recomputation elsewhere) can catch it. Never run one outside a test.

* ``noise``: adds Gaussian noise of ``NOISE_SCALE`` times each token's RMS to the output;
* ``zero``: returns zeros;
* ``skip``: skips every other block of its span (the first, the third, ...: a one-block
  span skips its block), saving half the compute;
* ``stale``: replays its previous output of the session (the last token's, repeated)
  instead of this step's; the first step of a session is honest;
* ``sometimes``: honest, except on a random ``SOMETIMES_RATE`` of steps, where it adds
  noise as ``noise`` does;
* ``model``: computes with other weights: every weight matrix re-quantised to
  ``MODEL_BITS``-bit symmetric integers per group of ``MODEL_GROUP`` (as a node serving a
  cheaper quantisation than the model's would).

Two kinds of transform, both pure functions of their inputs: the span a node computes with
(``cheating_span``: ``skip`` and ``model``) and the output of a step (``Misbehavior.output``:
the others). The node applies them; this module knows nothing of sessions or networks.
"""

from __future__ import annotations

import copy
import random
from collections import OrderedDict

import torch
from torch import nn

from layerchain.errors import ConfigError
from layerchain.model.span import SpanModel

MODES = ("noise", "zero", "skip", "stale", "sometimes", "model")
NOISE_SCALE = 1.0  # noise std, times the token's RMS over the hidden size (0.5 is caught on
# SmolLM2 too, but its nearest audited step sits at 0.023, just past AUDIT_TOLERANCE)
SOMETIMES_RATE = 0.2  # fraction of steps a `sometimes` node cheats on
MODEL_BITS = 4  # `model`: weights re-quantised to this many bits (symmetric, per group)
MODEL_GROUP = 32  # weights per quantisation group (along the input dimension)
STALE_SESSIONS = 1024  # `stale`: sessions whose last output token is kept (oldest forgotten)


def check_mode(mode: str) -> None:
    """ConfigError unless ``mode`` is "" (honest) or one of ``MODES``."""
    if mode and mode not in MODES:
        raise ConfigError(
            f"misbehave mode {mode!r} is unknown", hint=f"use one of {', '.join(MODES)}"
        )


def add_noise(out: torch.Tensor, generator: torch.Generator, scale: float = NOISE_SCALE) -> torch.Tensor:
    """``out`` [B, T, H] plus Gaussian noise of ``scale`` times each token's RMS, same dtype."""
    x = out.float()
    rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()  # [B, T, 1]
    noise = torch.randn(x.shape, generator=generator)
    return (x + scale * rms * noise).to(out.dtype)


def replay(previous: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``previous`` [B, T', H] in the shape of ``out`` [B, T, H]: itself when the shapes
    agree, else its last token repeated T times."""
    if previous.shape == out.shape:
        return previous
    return previous[:, -1:].expand(out.shape).contiguous().to(out.dtype)


def requantize(weight: torch.Tensor, bits: int = MODEL_BITS, group: int = MODEL_GROUP) -> torch.Tensor:
    """``weight`` rounded to ``bits``-bit symmetric integers times one float scale per group
    of ``group`` consecutive values (absmax / (2^(bits-1) - 1)); a copy, same shape and dtype.
    Values that do not fill a last group are kept as they are."""
    flat = weight.detach().reshape(-1).float()
    whole = flat.numel() // group * group
    groups = flat[:whole].reshape(-1, group)
    qmax = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    rounded = (torch.round(groups / scale).clamp(-qmax - 1, qmax) * scale).reshape(-1)
    return torch.cat([rounded, flat[whole:]]).reshape(weight.shape).to(weight.dtype)


class _Skipped(nn.Module):
    """A decoder block that does nothing: the hidden states pass through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def skipped_blocks(start: int, end: int) -> range:
    """The blocks of ``[start, end)`` a ``skip`` node leaves out: every other, from the first."""
    return range(start, end, 2)


def cheating_span(mode: str, span: SpanModel) -> SpanModel:
    """The span a node in ``mode`` computes with: ``span`` itself unless the mode changes
    the computation (``skip``: a span sharing ``span``'s blocks, with the skipped ones
    passing their input through; ``model``: a copy with re-quantised weight matrices).
    ``span`` is never modified."""
    if mode == "skip":
        skipped = set(skipped_blocks(span.start, span.end))
        layers: list[nn.Module] = [
            _Skipped() if block in skipped else layer
            for block, layer in zip(range(span.start, span.end), span.layers, strict=True)
        ]
        return SpanModel(span.spec, span.start, span.end, layers, span.config)
    if mode == "model":
        # the spec is immutable and shared (its weight source holds modules, which cannot be
        # copied): only the span's own tensors are duplicated
        other = copy.deepcopy(span, memo={id(span.spec): span.spec})
        with torch.no_grad():
            for parameter in other.parameters():
                if parameter.dim() >= 2:  # matrices; norms and biases stay
                    parameter.copy_(requantize(parameter))
        return other
    return span


class Misbehavior:
    """The output side of a cheating node in ``mode``: ``output`` turns each step's honest
    output into what the node returns. ``seed`` fixes its random choices (None: fresh)."""

    def __init__(self, mode: str, seed: int | None = None) -> None:
        check_mode(mode)
        self.mode = mode
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(self.rng.getrandbits(63))
        self._last: OrderedDict[str, torch.Tensor] = OrderedDict()  # session -> its last
        # output's last token [1, 1, H]
        self.cheated = 0  # steps answered with a wrong output (``skip``/``model``: all)

    def output(self, session_id: str, out: torch.Tensor) -> torch.Tensor:
        """What the node returns for a step of ``session_id`` whose honest output (of the
        span it computes with) is ``out`` [1, T, H]."""
        mode = self.mode
        if mode == "noise" or (mode == "sometimes" and self.rng.random() < SOMETIMES_RATE):
            self.cheated += 1
            return add_noise(out, self.generator)
        if mode == "zero":
            self.cheated += 1
            return torch.zeros_like(out)
        if mode == "stale":
            previous = self._last.pop(session_id, None)
            self._last[session_id] = out[:, -1:].clone()  # [1, 1, H]: bounded memory
            while len(self._last) > STALE_SESSIONS:
                self._last.popitem(last=False)
            if previous is not None:
                self.cheated += 1
                return replay(previous, out)
        elif mode in ("skip", "model"):
            self.cheated += 1
        return out
