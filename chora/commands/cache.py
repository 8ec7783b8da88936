"""`chora cache`: the generator's result cache.

    chora cache purge [CONFIG_ID]

``purge`` removes every entry of the cache bucket, or only those of one
content config (its id is the first token of every key), and says how many
there were. The next identical request renders again. Entries also expire by
themselves (the config's ``cache:`` TTL); an edited config or template never
needs a purge, since its hashes are in the key.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from services.settings import Settings


async def run_purge(
    nc, settings: Settings, config_id: str | None = None, out: TextIO | None = None, as_json: bool = False
) -> int:
    from bus.cache import ResultCacheStore
    from bus.content import ContentStore
    from bus.topology import Topology

    out = out or sys.stdout
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    store = ResultCacheStore(js, topo.cache_bucket, ContentStore(js, topo.content_bucket))
    try:
        n = await store.purge(config_id)
    except Exception as e:
        print(f"chora: cannot purge the result cache {topo.cache_bucket}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"bucket": topo.cache_bucket, "config_id": config_id, "purged": n}), file=out)
        return 0
    whose = f" of {config_id}" if config_id else ""
    print(f"purged {n} cache entr{'y' if n == 1 else 'ies'}{whose} from {topo.cache_bucket}", file=out)
    return 0


def _config_id(text: str) -> str:
    from composition.configs import ID_PATTERN, valid_config_id

    if not valid_config_id(text):
        raise argparse.ArgumentTypeError(f"{text[:140]!r} is not a content config id ({ID_PATTERN})")
    return text


def _purge(args: argparse.Namespace) -> int:
    from chora.common import run_connected

    return run_connected(lambda nc, settings: run_purge(nc, settings, args.config_id, as_json=args.json), args)


def register(subparsers) -> None:
    from chora.options import add_command

    cache = subparsers.add_parser("cache", help="the generator's result cache").add_subparsers(
        dest="cache_cmd", required=True
    )
    sp = add_command(
        cache, "purge", connects=True, json=True, help="remove every cached result, or those of one content config"
    )
    sp.add_argument("config_id", nargs="?", type=_config_id, metavar="CONFIG_ID", help="only this config's entries")
    sp.set_defaults(func=_purge)
