"""Subcommands of `chora` beyond the core ones in chora.cli (helpers they share: chora.common).

Each module here has ``register(subparsers)``, which adds its parsers and sets
``func`` (taking the parsed args, returning an exit code). Listed in
:data:`chora.cli.COMMAND_MODULES`.
"""
