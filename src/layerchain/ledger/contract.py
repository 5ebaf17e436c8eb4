"""The settlement contract's build: compile ``contracts/*.sol`` and load the committed artifact.

``contracts/LayerchainLedger.sol`` is compiled by npm's solc (``solcjs``, WebAssembly: no
compiler download) with fixed settings (``SETTINGS``: cancun, via IR, optimizer 200 runs, no
metadata hash, so the bytecode does not depend on the path or the machine). The result is
committed as ``ARTIFACT`` (``layerchain/ledger/contracts/LayerchainLedger.json``)::

    {"abi": [...], "bytecode": "0x...", "contract": "LayerchainLedger",
     "deployed_bytecode": "0x...", "settings": {...}, "solc": "0.8.37",
     "source_sha256": {"LayerchainLedger.sol": hex}}

written with sorted keys and a 2-space indent, so compiling the same sources again gives
the same bytes (``tests/test_contract_artifact.py`` fails on drift). Deployed code never
needs the compiler: the EVM backend (``ledger/evm.py``) loads the artifact. Regenerate
it with ``python -m layerchain.ledger.contract`` after editing the contract.

Tools come from npm (``make install`` runs ``npm ci``); ``find_tool`` looks in
``$LAYERCHAIN_NODE_MODULES/.bin``, then the ``node_modules/.bin`` of the repository this
file sits in, then ``PATH``. This module knows nothing of chains, accounts or Web3.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from layerchain.errors import LedgerError

CONTRACT_NAME = "LayerchainLedger"
SOLC_VERSION = "0.8.37"  # pinned by package-lock.json
ARTIFACT = Path(__file__).parent / "contracts" / f"{CONTRACT_NAME}.json"
# the compiler's input settings, recorded in the artifact: changing one is drift
SETTINGS: dict[str, Any] = {
    "evmVersion": "cancun",
    "viaIR": True,  # the legacy code generator runs out of stack on 10-value views and slash
    "optimizer": {"enabled": True, "runs": 200},
    "metadata": {"bytecodeHash": "none", "appendCBOR": False},
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}
_COMPILE_TIMEOUT_S = 300.0  # solcjs (WASM) takes ~10-30 s on one slow core
_TOOLS = ("solcjs", "anvil")


def _repo_root() -> Path | None:
    """The checkout this file belongs to (the first parent holding ``contracts/``), if any."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "contracts" / f"{CONTRACT_NAME}.sol").is_file():
            return parent
    return None


def contracts_dir() -> Path:
    """``<repo>/contracts``; LedgerError when layerchain runs from an installed wheel."""
    root = _repo_root()
    if root is None:
        raise LedgerError(
            "the contract sources (contracts/) are not here: compile from a layerchain checkout"
        )
    return root / "contracts"


def find_tool(name: str) -> Path:
    """The npm tool ``name`` ("solcjs" or "anvil"): ``$LAYERCHAIN_NODE_MODULES/.bin``, then
    ``node_modules/.bin`` in this file's checkout (or any parent), then ``PATH``.

    LedgerError naming ``make install`` when none has it."""
    if name not in _TOOLS:
        raise LedgerError(f"unknown EVM tool {name!r}: expected one of {', '.join(_TOOLS)}")
    candidates: list[Path] = []
    env = os.environ.get("LAYERCHAIN_NODE_MODULES")
    if env:
        candidates.append(Path(env) / ".bin" / name)
    for parent in Path(__file__).resolve().parents:
        candidates.append(parent / "node_modules" / ".bin" / name)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    raise LedgerError(
        f"{name} is not installed (looked in $LAYERCHAIN_NODE_MODULES/.bin, node_modules/.bin "
        "and PATH)",
        hint="run `make install` (npm ci) in the layerchain checkout",
    )


def _sources() -> dict[str, str]:
    """``{file name: text}`` of every ``contracts/*.sol``, sorted by name."""
    directory = contracts_dir()
    return {path.name: path.read_text() for path in sorted(directory.glob("*.sol"))}


def solc(request: dict[str, Any]) -> dict[str, Any]:
    """Run ``solcjs --standard-json`` on ``request``; return its output (contracts by file).

    LedgerError if solcjs is missing (``make install``), is not ``SOLC_VERSION``, or the
    sources do not compile (the compiler's first error)."""
    solcjs = find_tool("solcjs")
    try:
        version = subprocess.run(
            [str(solcjs), "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
        if not version.startswith(SOLC_VERSION + "+"):
            raise LedgerError(
                f"solcjs is {version}, the artifact is built with {SOLC_VERSION}",
                hint="run `make install` (package-lock.json pins the compiler)",
            )
        done = subprocess.run(
            [str(solcjs), "--standard-json"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=_COMPILE_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as error:
        raise LedgerError(f"solcjs failed to run: {error}", hint="run `make install`") from None
    try:  # solcjs may print a banner before the JSON
        output: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        raise LedgerError(f"solcjs printed no JSON: {done.stdout[:200]!r}") from None
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        first = str(errors[0].get("formattedMessage") or errors[0].get("message", "?"))
        raise LedgerError(f"the contract does not compile: {first.strip().splitlines()[0]}")
    return output


def compile_contract() -> dict[str, Any]:
    """Compile ``contracts/*.sol`` with npm solc; return the artifact (see the module doc).

    LedgerError as ``solc`` raises it, or when run outside a checkout."""
    sources = _sources()
    output = solc(
        {
            "language": "Solidity",
            "sources": {name: {"content": text} for name, text in sources.items()},
            "settings": SETTINGS,
        }
    )
    compiled = output["contracts"][f"{CONTRACT_NAME}.sol"][CONTRACT_NAME]
    return {
        "contract": CONTRACT_NAME,
        "solc": SOLC_VERSION,
        "settings": SETTINGS,
        "source_sha256": source_hashes(sources),
        "abi": compiled["abi"],
        "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
        "deployed_bytecode": "0x" + compiled["evm"]["deployedBytecode"]["object"],
    }


def source_hashes(sources: dict[str, str] | None = None) -> dict[str, str]:
    """``{file name: sha256 hex}`` of the contract sources (``contracts/*.sol`` by default):
    what the artifact records, so a stale artifact shows without a compiler."""
    sources = _sources() if sources is None else sources
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sources.items()}


def artifact_text(artifact: dict[str, Any]) -> str:
    """The artifact's exact file text: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(artifact, indent=2, sort_keys=True) + "\n"


def load_artifact() -> dict[str, Any]:
    """The committed artifact (``abi``, ``bytecode``, ...); LedgerError if missing or unreadable."""
    try:
        artifact: dict[str, Any] = json.loads(ARTIFACT.read_text())
    except (OSError, ValueError) as error:
        raise LedgerError(
            f"the contract artifact {ARTIFACT} is missing or unreadable ({error})",
            hint="run `python -m layerchain.ledger.contract` in a checkout",
        ) from None
    return artifact


def write_artifact() -> Path:
    """Compile and (re)write ``ARTIFACT``; return its path."""
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(artifact_text(compile_contract()))
    return ARTIFACT


def main() -> int:
    try:
        path = write_artifact()
    except LedgerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
