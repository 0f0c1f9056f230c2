"""Option schemas: declared per plugin, validated by the core at compose() time, printed by the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import sft_plugins
from sft_plugins import Option, PluginError, hookimpl

BUILTINS = ("fused_ce", "smart_checkpointing", "padding_free", "packing", "adamw_8bit")


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_declares_a_schema_with_docs(name):
    schema = sft_plugins.available()[name].options
    assert schema, f"{name} declares no options"
    for option in schema:
        assert isinstance(option, Option) and option.doc and option.error(option.default) is None, option


def test_unknown_option_fails_at_compose_with_a_suggestion():
    with pytest.raises(PluginError) as err:
        sft_plugins.compose(["padding_free"], options={"padding_free": {"atention": "loop"}})
    message = str(err.value)
    assert "padding_free" in message and "'atention'" in message and "did you mean 'attention'" in message


@pytest.mark.parametrize("name, options, needle", [
    ("padding_free", {"attention": "fast"}, "option 'attention' must be"),
    ("packing", {"max_length": 1}, "option 'max_length' must be int >= 2"),
    ("packing", {"repack_each_epoch": "yes"}, "option 'repack_each_epoch' must be bool"),
    ("smart_checkpointing", {"every_n_layers": True}, "option 'every_n_layers' must be int >= 1"),
    ("smart_checkpointing", {"mlp_chunks": "many"}, "option 'mlp_chunks' must be int >= 0 | 'auto'"),
    ("adamw_8bit", {"kernel": "cuda"}, "option 'kernel' must be"),
    ("fused_ce", {"extra_model_types": ["llama", 3]}, "list of model_type strings"),
])
def test_bad_values_fail_at_compose(name, options, needle):
    with pytest.raises(PluginError, match="bad options for " + name) as err:
        sft_plugins.compose([name], options={name: options})
    assert needle in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(PluginError) as err:
        sft_plugins.compose(["smart_checkpointing"], options={"smart_checkpointing": {
            "prefetch": -1, "offload": "sometimes", "nope": 1}})
    message = str(err.value)
    assert "'prefetch'" in message and "'offload'" in message and "'nope'" in message


def test_defaults_filled_in_and_ints_accepted_for_floats():
    stack = sft_plugins.compose(["smart_checkpointing", "packing"],
                                options={"smart_checkpointing": {"host_budget_gb": 2}})
    sc = stack.options["smart_checkpointing"]
    assert sc["host_budget_gb"] == 2 and sc["offload"] == "auto" and sc["lean_mlp"] == "auto"
    assert stack.options["packing"] == {o.name: o.default for o in sft_plugins.available()["packing"].options}


def test_option_accepts_choice_type_and_none():
    opt = Option("chunks", "auto", "doc", type=int, minimum=0, choices=("auto",), nullable=True)
    assert opt.error("auto") is None and opt.error(3) is None and opt.error(None) is None
    assert opt.error(True) is not None and opt.error(-1) is not None and opt.error(1.5) is not None
    assert opt.kind() == "int >= 0 | 'auto' | None"


def test_plugin_without_schema_gets_options_unchecked():
    seen = {}

    def sft_check(options):
        seen.update(options)
        return []

    plugin = types.SimpleNamespace(__name__="free", sft_check=hookimpl(sft_check))
    stack = sft_plugins.compose(["free"], options={"free": {"anything": 1}}, plugins={"free": plugin})
    stack.prepare()
    assert seen == {"anything": 1}


def test_schema_of_a_local_plugin_is_validated():
    plugin = types.SimpleNamespace(__name__="mine", sft_options=hookimpl(lambda: [Option("k", 1, "doc", type=int)]),
                                   sft_check=hookimpl(lambda options: []))
    with pytest.raises(PluginError, match="option 'k' must be int"):
        sft_plugins.compose(["mine"], options={"mine": {"k": "x"}}, plugins={"mine": plugin})


def test_cli_info_and_list_options_print_the_schema():
    import os

    env = {**os.environ, "COLUMNS": "300"}  # one table row per option
    out = subprocess.run([sys.executable, "-m", "sft_plugins.cli", "info", "packing"], capture_output=True,
                         text=True, check=True, env=env).stdout
    for option in sft_plugins.available()["packing"].options:
        assert option.name in out and option.doc[:30] in out
    listing = json.loads(subprocess.run([sys.executable, "-m", "sft_plugins.cli", "list", "--json"],
                                        capture_output=True, text=True, check=True).stdout)
    names = {o["name"] for o in listing["smart_checkpointing"]["options"]}
    assert {"offload", "host_budget_gb", "lean_mlp"} <= names
