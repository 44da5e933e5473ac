"""Command-line subcommands (argparse + printing) on top of the libraries.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``; ``lowbit.cli``
wires them together.
"""
