"""The CLI's entry point registers only the module of the command it runs (a one-shot
``generate`` skips the other areas' imports), and everything for --help or an unknown
command; importers of ``app`` get every command."""

from __future__ import annotations

import subprocess
import sys

import typer.main

from layerchain.cli import main as cli_main


def _top_level(app) -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_command_is_mapped_to_the_module_that_registers_it():
    assert _top_level(cli_main.app) == set(cli_main._COMMANDS)
    for command, module in cli_main._COMMANDS.items():
        alone = typer.Typer()
        alone.callback()(lambda: None)
        __import__(f"layerchain.cli.{module}", fromlist=["register"]).register(alone)
        assert command in _top_level(alone), (command, module)


PROBE = """
import sys
sys.argv = ["layerchain", *sys.argv[1:]]
from layerchain.cli.main import main
try:
    main()
except SystemExit:
    pass
loaded = sorted(m for m in sys.modules if m.startswith("layerchain.cli.") and m != "layerchain.cli.main")
print(",".join(loaded), file=sys.stderr)
"""


def _cli_modules_loaded(*argv: str) -> tuple[str, set[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True,
                          text=True, timeout=120)
    return done.stdout, set(done.stderr.strip().splitlines()[-1].split(","))


def test_a_command_imports_its_own_module_only_and_help_lists_all():
    out, loaded = _cli_modules_loaded("generate", "--help")
    assert "--prompt" in out
    assert "layerchain.cli.generate" in loaded
    assert not loaded & {"layerchain.cli.bench", "layerchain.cli.chain", "layerchain.cli.train"}
    out, loaded = _cli_modules_loaded("demo", "--help")  # one command registered: still by name
    assert "Usage: layerchain demo" in out
    out, loaded = _cli_modules_loaded("--help")
    assert "generate" in out and "bench" in out and "layerchain.cli.bench" in loaded


def test_a_one_shot_command_ends_without_teardown_after_its_exit_handlers():
    """skip_teardown: output still flushed (stdout is a pipe: block-buffered), exit handlers
    still run (logging's flush among them), exit status 0; what only module teardown would
    run (a module global's finalizer) does not."""
    code = (
        "import atexit, os, sys\n"
        "import layerchain.cli.main as m\n"
        "class Loud:\n"
        "    def __del__(self, write=os.write):\n"
        "        write(1, b'torn down\\n')\n"
        "sys.modules['loud'] = type(sys)('loud')\n"  # a module global: finalized at teardown
        "sys.modules['loud'].keep = Loud()\n"
        "def probe(skip: bool = False):\n"
        "    atexit.register(lambda: sys.stdout.write('handler ran\\n'))\n"
        "    sys.stdout.write('answer\\n')\n"
        "    if skip:\n"
        "        m.skip_teardown()\n"
        "m._app.command('probe')(probe)\n"
        "m._COMMANDS['probe'] = 'layerchain.cli.main'\n"
        "m._register = lambda modules: None\n"
        "sys.argv = ['layerchain', 'probe', *sys.argv[1:]]\n"
        "m.main()\n"
    )
    for args, lines in (([], ["answer", "handler ran", "torn down"]),
                        (["--skip"], ["answer", "handler ran"])):
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert sorted(done.stdout.splitlines()) == sorted(lines), args
