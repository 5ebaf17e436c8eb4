"""The attacks of ``layerchain bench hostile``, one small named coroutine each, in run order.

Each is ``async def attack(stage: Stage) -> Outcome`` (``base.py``); the bench runs it
while an honest client generates, and judges it from what it observed.
"""

from __future__ import annotations

from layerchain.bench.attacks.base import Attack, Outcome, Stage
from layerchain.bench.attacks.nodes import session_squatting, slowloris
from layerchain.bench.attacks.peers import ban_evasion, error_code_liars, slow_liar
from layerchain.bench.attacks.records import forged_records, rotating_endpoints
from layerchain.bench.attacks.requests import ban_poisoning, long_prompt

ATTACKS: dict[str, Attack] = {
    "forged_records": forged_records,  # issue 12 items 1, 2
    "slow_liar": slow_liar,  # item 3
    "error_code_liars": error_code_liars,  # item 4
    "ban_poisoning": ban_poisoning,  # item 5
    "ban_evasion": ban_evasion,  # item 6
    "rotating_endpoints": rotating_endpoints,  # item 7
    "slowloris": slowloris,  # item 8
    "session_squatting": session_squatting,  # item 9
    "long_prompt": long_prompt,  # item 10
}

__all__ = ["ATTACKS", "Attack", "Outcome", "Stage"]
