"""``sft-plugins``: list the plugins and their options, train with them, run A/B ablations."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any


def _plugins() -> dict[str, Any]:
    from ._discovery import available

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load errors are shown in the listing itself
        return available()


def _options_table(info: Any) -> Any:
    from rich.table import Table

    table = Table(title=f"{info.name} options", title_justify="left")
    for column in ("option", "accepts", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for option in info.options or ():
        table.add_row(option.name, option.kind(), repr(option.default), option.doc)
    return table


def _info(name: str, as_json: bool) -> int:
    plugins = _plugins()
    info = plugins.get(name)
    if info is None:
        print(f"sft-plugins: unknown plugin {name!r}; available: {', '.join(sorted(plugins))}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(info.as_dict(), indent=2, default=repr))
        return 0
    from rich.console import Console

    console = Console()
    origin = "built-in" if info.source == "builtin" else f"{info.distribution} {info.version} ({info.value})"
    console.print(f"[bold]{name}[/bold] — {origin}")
    if info.error:
        console.print(f"[red]load error: {info.error}[/red]")
        return 1
    console.print(info.summary)
    parity = "none promised" if info.loss_parity is None else f"relative per-step loss ≤ {info.loss_parity:g}"
    console.print(f"hooks: {', '.join(info.hooks)}\nloss parity: {parity}")
    if info.quantized:
        console.print(f"on a 4-/8-bit (QLoRA) base: {info.quantized}")
    if info.options is None:
        console.print("options: not declared (passed to the plugin unchecked)")
    else:
        console.print(_options_table(info))
    return 0


def _list(as_json: bool, with_options: bool) -> int:
    plugins = _plugins()
    if as_json:
        print(json.dumps({name: info.as_dict() for name, info in plugins.items()}, indent=2, default=repr))
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
    console = Console()
    console.print(table)
    quantized = [(name, info.quantized) for name, info in plugins.items() if info.quantized]
    if quantized:
        console.print("On a bitsandbytes 4-/8-bit (QLoRA) base:")
        for name, text in quantized:
            console.print(f"  [bold]{name}[/bold]: {text}")
    if with_options:
        for info in plugins.values():
            if info.options:
                console.print(_options_table(info))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        # TRL's parser owns train's flags (every SFTConfig/ModelConfig field); imported only when asked
        from .train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["ablate"]:
        # The ablation runner owns its options; import it only when asked (it imports torch).
        from .ablate import main as ablate_main

        return ablate_main(argv[1:])
    from . import __version__

    parser = argparse.ArgumentParser(prog="sft-plugins", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sft-plugins {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list installed plugins (built-in and entry points)")
    p_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_list.add_argument("--options", action="store_true", help="also print every plugin's options")
    p_info = sub.add_parser("info", help="one plugin: where it comes from, its hooks and every option")
    p_info.add_argument("name", help="the plugin's name, as `sft-plugins list` shows it")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("train", help="fine-tune with plugins from a TRL `trl sft` YAML (see `sft-plugins train --help`)")
    sub.add_parser("ablate", help="run an A/B ablation of plugins (see `sft-plugins ablate --help`)")
    args = parser.parse_args(argv)
    if args.command == "list":
        return _list(args.json, args.options)
    if args.command == "info":
        return _info(args.name, args.json)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
