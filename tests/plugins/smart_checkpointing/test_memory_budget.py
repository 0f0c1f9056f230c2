"""smart_checkpointing's ``memory_budget``: the planner's arithmetic, and on the CPU (with the device's memory
figures given by the test) a first step that measures, then layers left whole or with their input on the
device as the budget allows, with the baseline's losses."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins.plugins.smart_checkpointing import budget
from sft_plugins.plugins.smart_checkpointing.patch import patch_of

from .helpers import NAME

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 2**30


def test_parse_budget():
    total = 80 * GiB
    assert budget.parse_budget("tight", total) is None
    assert budget.parse_budget("auto", total) == total
    assert budget.parse_budget(0.5, total) == 40 * GiB
    assert budget.parse_budget(24, total) == 24 * GiB


def test_plan_modes_fills_the_budget_from_the_last_layer():
    m = budget.Measurement(base=2 * GiB, peak=3 * GiB, tokens=1000, input_per_token=4096.0,
                           saved_per_token=100_000.0, on_device=1)
    # 16k tokens at most: a whole layer 1.6e9 bytes, an input 6.6e7 bytes; transient (1 GiB - one input) x 16
    n_none, n_device = budget.plan_modes(16, 40 * GiB, m, 16_000)
    transient = (GiB - 4096 * 1000) * 16
    free = 40 * GiB * 0.9 - 2 * GiB - transient
    assert n_none == int(free // (100_000 * 16_000))
    assert n_device == min(16 - n_none, int((free - n_none * 100_000 * 16_000) // (4096 * 16_000)))
    assert budget.plan_modes(16, 10**15, m, 16_000) == (16, 0)  # room for everything: nothing recomputed
    assert budget.plan_modes(16, 3 * GiB, m, 16_000) == (0, 0)  # already past it: the tightest plan


def test_apply_modes_counts_from_the_end():
    class Plan:
        checkpoint, keep = True, False

    plans = [Plan() for _ in range(6)]
    assert budget.apply_modes(plans, 2, 1, keep_last=1) == {"none": 2, "device": 1, "offload": 3}
    assert [(p.checkpoint, p.keep) for p in plans] == [(True, False)] * 3 + [(True, True)] + [(False, False)] * 2
    budget.apply_modes(plans, 0, 0, keep_last=1)  # keep_last_on_gpu still holds
    assert [(p.checkpoint, p.keep) for p in plans] == [(True, False)] * 5 + [(True, True)]


def _losses(tok, tmp_path, options, total=None):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sft_plugins.embedded import build_dataset, build_model

    torch.manual_seed(0)
    model = build_model(tokenizer=tok)
    args = SFTConfig(output_dir=str(tmp_path / "b"), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, max_length=64,
                     seed=0, disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    names = [NAME] if options is not None else []
    with pytest.MonkeyPatch.context() as mp:
        # the device's figures: 1 GiB before a step, the step's peak 1 GiB above it, ``total`` allowed
        mp.setattr(budget, "measurable", lambda: True)
        mp.setattr(budget, "device_memory", lambda: (GiB, 2 * GiB, total or 0))
        mp.setattr(budget, "reset_peak", lambda: None)
        with sft_plugins.compose(names, options={NAME: options} if names else None) as stack:
            trainer = SFTTrainer(**stack.prepare(model=model, args=args, processing_class=tok, peft_config=lora,
                                                 train_dataset=build_dataset(40, max_words=16)))
            trainer.train()
            patch = patch_of(trainer.model) if names else None
            report = (patch.budget, dict(patch.offloader.counters)) if patch is not None else None
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], report


def test_budget_plan_keeps_the_losses(tok, tmp_path):
    """Room for everything: both layers left whole (no recompute). Then a budget with room for the two inputs at
    the largest step (4 x 64 tokens) but not for a whole layer: both checkpointed with their input on the device.
    Then room for one input: one kept, one offloaded. The baseline's losses every time."""
    base, _ = _losses(tok, tmp_path, None)
    options = {"offload": "always", "memory_budget": "auto"}
    ours, (state, counters) = _losses(tok, tmp_path, options, total=10**15)
    m = state.measurement
    assert state.calibrated and m.tokens > 0 and m.saved_per_token > 2 * m.input_per_token > 0
    assert state.modes == {"none": 2, "device": 0, "offload": 0} and counters["unchecked_calls"] > 0
    assert ours == pytest.approx(base, rel=sft_plugins.available()[NAME].loss_parity)

    largest = 4 * 64
    transient = (m.peak - m.base - m.on_device * m.input_per_token * m.tokens) * largest / m.tokens
    free = 2.5 * m.input_per_token * largest  # two inputs fit, a whole layer does not
    total = int((free + m.base + transient) / (1 - budget.MARGIN)) + 1
    ours, (state, counters) = _losses(tok, tmp_path, options, total=total)
    assert state.modes == {"none": 0, "device": 2, "offload": 0} and counters["unchecked_calls"] == 0
    assert ours == pytest.approx(base, rel=sft_plugins.available()[NAME].loss_parity)
    host_bytes_both_kept = counters["host_bytes"] + counters["pageable_bytes"]  # the first (tight) step's

    # room for one input only: the last layer keeps it on the device, the first offloads it
    total = int((1.5 * m.input_per_token * largest + m.base + transient) / (1 - budget.MARGIN)) + 1
    ours, (state, counters) = _losses(tok, tmp_path, options, total=total)
    assert state.modes == {"none": 0, "device": 1, "offload": 1} and counters["unchecked_calls"] == 0
    # the same batches: more went to the host than with both inputs kept, so the plan's offload ran
    assert counters["host_bytes"] + counters["pageable_bytes"] > host_bytes_both_kept
    assert ours == pytest.approx(base, rel=sft_plugins.available()[NAME].loss_parity)


def test_tight_is_the_default_and_plans_nothing(tok, tmp_path):
    _, (state, counters) = _losses(tok, tmp_path, {"offload": "always"})
    assert state is None and counters["unchecked_calls"] == 0


def test_bad_budget_is_refused_at_compose():
    with pytest.raises(sft_plugins.PluginError, match="memory_budget"):
        sft_plugins.compose([NAME], options={NAME: {"memory_budget": "lots"}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fraction", [1.0, 0.02])
def test_gpu_budget_is_measured_and_held(tok, tmp_path, fraction):
    """On the device: the first step measures, the plan holds the peak under the budget, the losses stay."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sft_plugins.embedded import build_dataset, build_model

    torch.manual_seed(0)
    model = build_model(tokenizer=tok, num_hidden_layers=8, hidden_size=512, intermediate_size=2048,
                        dtype=torch.bfloat16).cuda()
    args = SFTConfig(output_dir=str(tmp_path / "g"), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-4,
                     logging_steps=1, save_strategy="no", report_to="none", bf16=True, max_length=512, seed=0,
                     disable_tqdm=True)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    with sft_plugins.compose([NAME], options={NAME: {"memory_budget": fraction}}) as stack:
        trainer = SFTTrainer(**stack.prepare(model=model, args=args, processing_class=tok, peft_config=lora,
                                             train_dataset=build_dataset(64, max_words=200)))
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        state = patch_of(trainer.model).budget
        peak = torch.cuda.max_memory_allocated()
    print(f"memory_budget {fraction}: {state.modes}, peak {peak / GiB:.2f} GiB of {state.budget / GiB:.1f} GiB")
    assert state.calibrated and sum(state.modes.values()) == 8
    assert peak <= state.budget or state.modes["none"] == 0
    if fraction == 1.0:
        assert state.modes["none"] == 8
