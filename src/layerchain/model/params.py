"""``SamplingParams``: how to generate, a plain record (no torch: the CLI builds its option
defaults from it at import, ``tests/test_startup.py``). ``sampling`` acts on it."""

from __future__ import annotations

from dataclasses import dataclass

from layerchain.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. The CLI and the HTTP API build their defaults from these."""

    max_new_tokens: int = 128  # tokens generated at most
    temperature: float = 0.0  # softmax temperature; 0 = greedy (argmax)
    top_k: int = 0  # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus: smallest set of tokens with this total probability; 1 = all
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output (CTRL)
    seed: int = 0  # seed of the sampler's generator (sampling is deterministic per seed)
    stop: tuple[str, ...] = ()  # stop strings; generation ends before the first one

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
