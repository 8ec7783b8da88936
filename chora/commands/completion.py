"""`chora completion bash|zsh|tcsh`: a shell completion script for `chora`, made by shtab
from the very parser the command uses (so it names every subcommand and option).

    chora completion bash > ~/.local/share/bash-completion/completions/chora
    chora completion zsh > "${fpath[1]}/_chora"

shtab writes a static script once; completing then costs the shell nothing, where
argcomplete would start Python and import the CLI on every TAB.
"""

from __future__ import annotations

import argparse
from typing import Any

SHELLS = ("bash", "zsh", "tcsh")


def completion(args: argparse.Namespace, root: argparse.ArgumentParser) -> int:
    import shtab

    print(shtab.complete(root, shell=args.shell))
    return 0


def register(subparsers: Any, root: argparse.ArgumentParser) -> None:
    """``root``: the `chora` parser the script completes (this module does not import
    chora.cli: only chora/__main__.py does, see tests/unit/test_layers.py)."""
    sp = subparsers.add_parser("completion", help="print a shell completion script (bash, zsh, tcsh)")
    sp.add_argument("shell", choices=SHELLS)
    sp.set_defaults(func=lambda a: completion(a, root))
