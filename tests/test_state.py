"""Per-stack state: what a plugin's hooks share lives in the stack (``state``), not in module globals,
so two stacks in one process, prepared and undone interleaved, never see each other's runs."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import sft_plugins
from sft_plugins import hookimpl
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer
from sft_plugins.plugins.fused_ce import patch_of as fused_patch_of
from sft_plugins.plugins.smart_checkpointing.patch import patch_of as ckpt_patch_of

ALL = ["fused_ce", "smart_checkpointing", "padding_free", "packing"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _args(tmp_path, **overrides):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, use_cpu=True, bf16=False,
                report_to="none", save_strategy="no", max_length=64, seed=0)
    return SFTConfig(**{**base, **overrides})


def _prepare(stack, tok, tmp_path, n):
    model = build_model("tiny", tokenizer=tok, dtype=torch.float32)
    kwargs = stack.prepare(model=model, args=_args(tmp_path), train_dataset=build_dataset(n), processing_class=tok)
    return model, kwargs


def _attn_registry():
    from transformers import AttentionInterface

    return {k for k in AttentionInterface._global_mapping if k.startswith("sft_packed")}


def test_two_stacks_interleaved_do_not_see_each_other(tmp_path, tok):
    from trl.trainer import sft_trainer

    trl_add = sft_trainer.add_fused_lm_head
    opts = {"packing": {"repack_each_epoch": True}, "padding_free": {"attention": "loop"}}
    a = sft_plugins.compose(ALL, options=opts)
    b = sft_plugins.compose(ALL, options=opts)
    model_a, kw_a = _prepare(a, tok, tmp_path / "a", 24)
    model_b, kw_b = _prepare(b, tok, tmp_path / "b", 40)

    # each stack's hooks handed their own objects to their own callbacks
    assert a.state_of("fused_ce").patch is fused_patch_of(model_a) is not fused_patch_of(model_b)
    assert a.state_of("smart_checkpointing").patch is ckpt_patch_of(model_a)
    assert b.state_of("smart_checkpointing").patch is ckpt_patch_of(model_b)
    rows_a, rows_b = a.state_of("packing").train_rows, b.state_of("packing").train_rows
    assert rows_a is not rows_b and rows_a.stats["examples"] == 24 and rows_b.stats["examples"] == 40
    repack = {type(cb).__name__: cb for cb in kw_a["callbacks"]}["RepackEachEpoch"]
    assert repack.rows is rows_a
    assert {type(cb).__name__: cb for cb in kw_b["callbacks"]}["RepackEachEpoch"].rows is rows_b

    a.undo()  # A gone: B's model keeps every patch, and the process-wide entries B needs stay
    assert fused_patch_of(model_a) is None and ckpt_patch_of(model_a) is None
    assert fused_patch_of(model_b) is not None and ckpt_patch_of(model_b) is not None
    assert model_b.config._attn_implementation == "sft_packed_loop" and "sft_packed_loop" in _attn_registry()
    assert sft_trainer.add_fused_lm_head is not trl_add  # B still intercepts TRL's head
    assert a.state_of("packing") is None and b.state_of("packing").train_rows is rows_b

    b.undo()
    assert fused_patch_of(model_b) is None and ckpt_patch_of(model_b) is None
    assert model_b.config._attn_implementation != "sft_packed_loop" and not _attn_registry()
    assert sft_trainer.add_fused_lm_head is trl_add


def test_reprepared_stack_starts_from_a_clean_state(tmp_path, tok):
    stack = sft_plugins.compose(["packing"], options={"packing": {"repack_each_epoch": True}})
    _, first = _prepare(stack, tok, tmp_path / "1", 16)
    rows_first = stack.state_of("packing").train_rows
    stack.undo()
    _, second = _prepare(stack, tok, tmp_path / "2", 30)
    rows_second = stack.state_of("packing").train_rows
    assert rows_second is not rows_first and rows_second.stats["examples"] == 30
    (cb,) = [cb for cb in second["callbacks"] if type(cb).__name__ == "RepackEachEpoch"]
    assert cb.rows is rows_second  # the callback repacks this run's dataset, not the first one's
    stack.undo()


def test_state_and_names_reach_every_hook():
    seen = []

    def record(hook):
        def impl(names, state):
            state.calls = getattr(state, "calls", []) + [hook]
            seen.append((hook, tuple(names), id(state)))
            return [] if hook in ("sft_check", "sft_callbacks") else None
        impl.__name__ = hook
        return hookimpl(impl)

    hooks = ["sft_check", "sft_update_args", "sft_patch_model", "sft_data_collator", "sft_callbacks"]
    plugin = types.SimpleNamespace(__name__="rec", **{h: record(h) for h in hooks})
    stack = sft_plugins.compose(["rec"], plugins={"rec": plugin})
    stack.prepare(model=object())
    assert [h for h, _, _ in seen] == hooks and {n for _, n, _ in seen} == {("rec",)}
    assert len({s for _, _, s in seen}) == 1 and stack.state_of("rec").calls == hooks
    stack.undo()
    assert stack.state_of("rec") is None


@pytest.mark.parametrize("name", ["fused_ce", "smart_checkpointing", "padding_free", "packing", "adamw_8bit"])
def test_no_plugin_module_holds_mutable_run_state(name):
    """Module-level containers in a plugin's modules may hold constants only (schemas, tables): after two
    stacks were prepared and undone above, nothing a run made is left in them."""
    __import__(f"sft_plugins.plugins.{name}")
    allowed = {"OPTIONS", "KNOWN_MODEL_TYPES", "MERGEABLE_KWARGS", "_COMPATIBLE_OPTIM", "_PAGED_OPTIM", "ATTENTION",
               "BACKENDS", "KERNEL_PROBES", "_REGISTRY_USERS", "__all__", "_SFT_OUTPUTS"}
    for mod_name, module in list(sys.modules.items()):
        if not mod_name.startswith(f"sft_plugins.plugins.{name}"):
            continue
        for attr, value in vars(module).items():
            if attr.startswith("__") or attr in allowed:
                continue
            if isinstance(value, (dict, list, set)) and value:
                pytest.fail(f"{mod_name}.{attr} is module-level mutable state: {value!r:.200}")
