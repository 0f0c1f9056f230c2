"""``sft-plugins``: list the plugins, run A/B ablations."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence


def _list(as_json: bool) -> int:
    from ._discovery import available

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load errors are shown in the listing itself
        plugins = available()
    if as_json:
        print(json.dumps({name: info.as_dict() for name, info in plugins.items()}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sft_plugins")
    for column in ("name", "from", "hooks", "loss parity", "status"):
        table.add_column(column)
    for name, info in plugins.items():
        origin = "built-in" if info.source == "builtin" else f"{info.distribution} {info.version}"
        hooks = ", ".join(h.removeprefix("sft_") for h in info.hooks if h != "sft_describe")
        parity = "-" if info.loss_parity is None else f"≤{info.loss_parity:g}"
        status = f"[red]load error: {info.error}[/red]" if info.error else (info.summary or "ok")
        table.add_row(name, origin, hooks, parity, status)
    Console().print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ablate"]:
        # The ablation runner owns its options; import it only when asked (it imports torch).
        from .ablate import main as ablate_main

        return ablate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="sft-plugins", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list installed plugins (built-in and entry points)")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("ablate", help="run an A/B ablation of plugins (see `sft-plugins ablate --help`)")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args.json)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
