"""Command line: ``lowbit demo | train | sweep | report | variance | coverage |
comm-variance``.

Each subcommand lives in the module that owns its concept and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires them together.
Bad values exit with status 2 and one line naming the problem (no traceback; set
``LOWBIT_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lowbit.commands.demo", "short digits study: fp, qat-8 and FQT PTQ/PSQ/BHQ at 8 and 4 bits"),
    "train": ("lowbit.experiments.train", "train one model with one recipe"),
    "sweep": ("lowbit.experiments.sweep", "run a grid of tasks × recipes × seeds, skipping finished runs"),
    "report": ("lowbit.experiments.report", "turn run folders into docs/results.md tables and plots"),
    "variance": ("lowbit.commands.variance", "variance decomposition, bounds, bin utilization, number formats"),
    "coverage": ("lowbit.commands.coverage", "which GEMMs of one training step run low-bit"),
    "comm-variance": ("lowbit.commands.comm_variance", "variance added by quantized gradient communication (data parallel)"),
}


DESCRIPTION = (f"lowbit, fully quantized training: lowbit {' | '.join(COMMANDS)} [options] "
               f"(lowbit COMMAND --help for each)")


class UsageError(ValueError):
    """A bad command-line value; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (unknown option, missing value, bad choice) as one line,
    ``PROG: error: MESSAGE``, exit status 2, like every other bad value (no usage block:
    ``--help`` shows it). Subcommand parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


class _ShowDefaults(argparse.HelpFormatter):
    """``--help`` names every option's default: ``(default X)`` is appended where the
    help text does not state one already (not for flags, nor for options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == argparse.SUPPRESS
                or isinstance(default, list) and not default
                or "default" in text.lower() or not action.option_strings
                or f"({default})" in text):  # "epochs per recipe (8)" names it already
            return text
        return f"{text} (default {str(default).replace('%', '%%')})"


def _version() -> str:
    """The installed distribution's version (``importlib.metadata``), else the source
    tree's ``lowbit.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:
        from . import __version__

        return f"{__version__} (source tree, not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}  # type: ignore[attr-defined]
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_ShowDefaults)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
        parser.commands[name] = p  # type: ignore[attr-defined]
    return parser


def _unknown(command: argparse.ArgumentParser, extra: list[str]) -> str:
    """argparse's "unrecognized arguments" for a subcommand, with the nearest option of
    that subcommand for each misspelt one (``--recipie`` → ``--recipe``)."""
    import difflib

    options = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for word in extra:
        near = difflib.get_close_matches(word.split("=")[0], options, n=1, cutoff=0.75) if word.startswith("--") else []
        if near:
            hints.append(f"{word.split('=')[0]} → {near[0]}")
    hint = f" (did you mean: {', '.join(hints)}?)" if hints else f" (see {command.prog} --help)"
    return f"unrecognized arguments: {' '.join(extra)}{hint}"


class _Stderr(logging.StreamHandler):
    """A handler writing to the ``sys.stderr`` of the moment (a test's capture, a
    redirected stream), not the one at its creation."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _show_lowbit_info() -> None:
    """lowbit's own INFO lines (a run's reason for no monitor, adaptive width changes) on
    stderr: Python's default drops INFO, and the README promises them in the run's output.
    Only the ``lowbit`` loggers: other libraries' logging stays as configured."""
    logger = logging.getLogger("lowbit")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    if not given:  # bare `lowbit`: the commands, not only "COMMAND is required"
        parser.print_help(sys.stderr)
        return 2
    if given and given[0] in parser.commands:  # type: ignore[attr-defined]
        # an unknown option is named before argparse's "required" check could hide it
        command = parser.commands[given[0]]  # type: ignore[attr-defined]
        options = [o for a in command._actions for o in a.option_strings]
        unknown = [w for w in given[1:] if w.startswith("--") and len(w) > 2
                   and not any(o.startswith(w.split("=")[0]) for o in options)]
        if unknown:
            command.error(_unknown(command, unknown))
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand, with the option it probably meant
        command = parser.commands[args.command]  # type: ignore[attr-defined]
        command.error(_unknown(command, extra))
    args._argv = list(sys.argv[1:] if argv is None else argv)  # which options were given (lowbit train --resume)
    _show_lowbit_info()
    module = importlib.import_module(args._module)
    from .gradmode import training_grad_mode
    try:
        with training_grad_mode():  # commands train and measure: main() called under inference_mode too
            return int(module.run(args) or 0)
    except (UsageError, ValueError, TypeError, OSError, KeyError) as exc:  # OSError: a file or folder
        from .kernels.cbuild import switched_off

        if os.environ.get("LOWBIT_DEBUG") and not switched_off("LOWBIT_DEBUG"):  # (=0 is off)
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        line = f"lowbit {args.command}: error: {msg}"
        from .experiments.launch import report_usage_error

        if not report_usage_error(line):  # a rank of lowbit train --nproc N: its launcher says it once
            print(line, file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during training (trainer.Terminated)
        term = type(exc).__name__ == "Terminated"
        from .experiments.launch import LAUNCH_DIR

        # said once: by lowbit train --nproc N's launcher, or by rank 0 under a bare torchrun
        if not os.environ.get(LAUNCH_DIR) and os.environ.get("RANK", "0") == "0":
            print(f"lowbit {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}",
                  file=sys.stderr)
        return 143 if term else 130


if __name__ == "__main__":
    # `python -m lowbit.cli`: run the importable module's main, so that the UsageError
    # raised by subcommands is the class caught there.
    from lowbit.cli import main as _main

    sys.exit(_main())
