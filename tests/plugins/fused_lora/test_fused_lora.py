"""fused_lora: one PEFT LoRA linear layer as the fused function gives PEFT's outputs and gradients (fp32, and
bf16 autocast to rounding); layers that are not plain LoRA at call time run PEFT's forward; through SFTTrainer
(``peft_config`` and a user-wrapped model) the losses are the baseline's, and ``undo()`` removes every patch."""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins.plugins import fused_lora
from sft_plugins.plugins.fused_lora import function

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "fused_lora"


def _lora_linear(bias=True, dropout=0.0, use_dora=False, adapters=1, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(48, 40, bias=bias, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=dropout, use_dora=use_dora,
                        init_lora_weights=False)
    model = get_peft_model(holder, config)
    for i in range(1, adapters):
        model.add_adapter(f"extra{i}", config)
    if adapters > 1:
        model.base_model.set_adapter(["default"] + [f"extra{i}" for i in range(1, adapters)])
    return model.base_model.model.proj


def _run(layer, forward, x):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = forward(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("adapters", [1, 2])
def test_same_outputs_and_gradients_as_peft(bias, adapters):
    layer = _lora_linear(bias=bias, adapters=adapters)
    for p in layer.base_layer.parameters():  # the base weight's and bias's gradients too
        p.requires_grad_(True)
    x = torch.randn(3, 5, 48)
    y0, dx0, g0 = _run(layer, layer.forward, x)
    calls = []
    apply = function._FusedLoraLinear.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(function._FusedLoraLinear, "apply", lambda *a: (calls.append(1), apply(*a))[1])
        y1, dx1, g1 = _run(layer, function.make_fused_forward(layer), x)
    assert calls == [1]
    assert g0.keys() == g1.keys() and len(g0) == 1 + bias + 2 * adapters
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-6, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_matches_peft_to_rounding():
    """peft's default under bf16 autocast: fp32 adapters, the input cast per adapter; ours multiplies in bf16
    as autocast does and rounds the scale-and-add once: the same values to bf16 rounding."""
    layer = _lora_linear()
    x = torch.randn(4, 16, 48).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y0, dx0, g0 = _run(layer, layer.forward, x)
        y1, dx1, g1 = _run(layer, function.make_fused_forward(layer), x)
    assert y1.dtype == y0.dtype == torch.bfloat16 and dx1.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y0.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx1.float(), dx0.float(), rtol=2e-2, atol=2e-2)
    for n in g0:
        assert g1[n].dtype == g0[n].dtype == torch.float32
        torch.testing.assert_close(g1[n], g0[n], rtol=3e-2, atol=3e-2, msg=n)


@pytest.mark.parametrize("kind", ["dropout", "dora", "disabled", "merged"])
def test_layers_that_are_not_plain_lora_run_peft(kind):
    layer = _lora_linear(dropout=0.1 if kind == "dropout" else 0.0, use_dora=kind == "dora")
    if kind == "disabled":
        layer.enable_adapters(False)
    if kind == "merged":
        layer.merge()
    calls = []
    apply = function._FusedLoraLinear.apply
    layer.eval()  # dropout off: the outputs are comparable
    x = torch.randn(2, 3, 48)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(function._FusedLoraLinear, "apply", lambda *a: (calls.append(1), apply(*a))[1])
        y = function.make_fused_forward(layer)(x)
    assert calls == [] and torch.equal(y, layer.forward(x))


def _sft_losses(tok, names, tmp_path, user_peft=False, steps=4):
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    from sft_plugins.embedded import build_dataset, build_model

    torch.manual_seed(0)
    model = build_model(tokenizer=tok)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    kwargs = {"peft_config": lora}
    if user_peft:
        model, kwargs = get_peft_model(model, lora), {}
    args = SFTConfig(output_dir=str(tmp_path / "_".join(names or ["base"])), max_steps=steps,
                     per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, max_length=96, seed=0, disable_tqdm=True)
    stack = sft_plugins.compose(names)
    with stack:
        trainer = SFTTrainer(**stack.prepare(model=model, args=args, processing_class=tok,
                                             train_dataset=build_dataset(32, max_words=16), **kwargs))
        trainer.train()
        patched = fused_lora.patched_layers(stack.state_of(NAME)) if NAME in names else 0
    left = sum("forward" in m.__dict__ for m in trainer.model.modules() if function.is_lora_linear(m))
    return [r["loss"] for r in trainer.state.log_history if "loss" in r], patched, left


@pytest.mark.parametrize("user_peft", [False, True], ids=["peft_config", "user_wrapped"])
def test_sft_trainer_same_losses_and_undo(tok, tmp_path, user_peft):
    base, _, _ = _sft_losses(tok, [], tmp_path, user_peft)
    ours, patched, left = _sft_losses(tok, [NAME], tmp_path, user_peft)
    assert patched == 2 * 7  # every projection of both layers
    assert left == 0  # undo() took every instance forward away
    assert len(base) == 4 and ours == pytest.approx(base, rel=sft_plugins.available()[NAME].loss_parity)


def test_all_six_together_train(tok, tmp_path):
    names = ["fused_ce", "smart_checkpointing", "padding_free", "packing", "adamw_8bit", NAME]
    losses, patched, _ = _sft_losses(tok, names, tmp_path)
    assert patched == 14 and all(torch.isfinite(torch.tensor(losses)))


def test_unknown_option_is_refused():
    with pytest.raises(sft_plugins.PluginError, match="fused_lora"):
        sft_plugins.compose([NAME], options={NAME: {"rank": 4}})


def test_profile_names_the_fused_projection_only_while_profiling():
    from sft_plugins.plugins.shared import profile_range

    layer = _lora_linear()
    forward = function.make_fused_forward(layer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _run(layer, forward, torch.randn(2, 3, 48))
    assert "sft_plugins.fused_lora" in {e.key for e in prof.key_averages()}
    assert type(profile_range("x")).__name__ == "nullcontext"  # unwatched: no record_function cost
