"""smart_checkpointing's ``lean_lora_cast``: under autocast, PEFT LoRA layers skip the fp32 copy of their input
that autocast casts straight back; losses and gradients stay bit for bit those with PEFT's cast, and it is
installed on LoRA layers the trainer adds after prepare() and undone."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

import sft_plugins
from sft_plugins.plugins.smart_checkpointing.lora_cast import lora_cast_modules

from .helpers import NAME, make_model, needs_cuda, sft, with_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_layers(model):
    return [m for layer in model.base_model.model.model.layers for m in lora_cast_modules(layer)]


def _autocast_steps(tok, lean: bool, steps: int = 3, device: str = "cpu"):
    """bf16 base, PEFT's fp32 adapters, autocast to bf16: losses, last gradients and the casts PEFT made."""
    model = with_lora(make_model(tok, layers=2, dtype=torch.bfloat16, device=device))
    lora = _lora_layers(model)
    assert lora and all(m.lora_A["default"].weight.dtype == torch.float32 for m in lora)
    casts = []  # the inputs PEFT's own cast turned to fp32
    peft_cast = BaseTunerLayer._cast_input_dtype

    def counted(self, x, dtype):
        out = peft_cast(self, x, dtype)
        casts.extend([1] if out is not x else [])
        return out

    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    losses = []
    with pytest.MonkeyPatch.context() as mp, \
            sft_plugins.compose([NAME], options={NAME: {"offload": "always" if device == "cpu" else "auto",
                                                        "lean_lora_cast": lean}}) as stack:
        mp.setattr(BaseTunerLayer, "_cast_input_dtype", counted)
        stack.prepare(model=model)
        for step in range(steps):
            ids = torch.randint(0, len(tok), (2, 11 + 5 * step), generator=gen).to(device)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            losses.append(loss.item())
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            with torch.no_grad():
                for p in params:
                    p -= 0.05 * p.grad
                    p.grad = None
    return losses, grads, len(casts), lora


def test_autocast_lora_without_the_input_cast_is_bit_identical(tok):
    peft_losses, peft_grads, peft_casts, _ = _autocast_steps(tok, lean=False)
    losses, grads, casts, lora = _autocast_steps(tok, lean=True)
    assert losses == peft_losses
    assert grads.keys() == peft_grads.keys() and grads
    for name in grads:
        assert torch.equal(grads[name], peft_grads[name]), name
    # PEFT casts each LoRA layer's input in the forward and again in the recompute (the MLP's runs through
    # lean_mlp there); none of those is left
    assert peft_casts > 3 * len(lora) and casts == 0
    assert all("_cast_input_dtype" not in m.__dict__ for m in lora)  # undone with the stack


@needs_cuda
def test_gpu_autocast_lora_without_the_input_cast_trains_the_same(tok):
    """On CUDA (offloaded checkpoints, Triton kernels) the casts are skipped too; the same losses and gradients
    up to the GPU's run-to-run noise (attention backward need not be deterministic)."""
    peft_losses, peft_grads, peft_casts, _ = _autocast_steps(tok, lean=False, device="cuda")
    losses, grads, casts, _ = _autocast_steps(tok, lean=True, device="cuda")
    assert peft_casts > 0 and casts == 0
    assert losses == pytest.approx(peft_losses, rel=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], peft_grads[name], rtol=2e-2, atol=1e-4, msg=name)


def test_the_cast_is_peft_s_wherever_it_changes_a_value(tok):
    model = with_lora(make_model(tok, layers=1, dtype=torch.bfloat16))
    with sft_plugins.compose([NAME], options={NAME: {"offload": "always"}}) as stack:
        stack.prepare(model=model)
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        x = torch.randn(3, q.in_features, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert q._cast_input_dtype(x, torch.float32) is x  # autocast undoes it: skipped
            q.lora_dropout["default"] = torch.nn.Dropout(0.1)  # dropout in fp32, then a cast: rounds twice
            assert q._cast_input_dtype(x, torch.float32).dtype == torch.float32
            q.lora_dropout["default"].eval()  # an inactive dropout is no dropout
            assert q._cast_input_dtype(x, torch.float32) is x
        assert q._cast_input_dtype(x, torch.float32).dtype == torch.float32  # no autocast: the matmul needs it
    assert "_cast_input_dtype" not in q.__dict__


def test_installed_on_the_layers_sfttrainer_wraps_after_prepare_and_off_by_option(tok):
    stack, trainer, model = sft(tok, [NAME], args_kw={"max_steps": 1})
    try:
        lora = [m for layer in model.model.layers for m in lora_cast_modules(layer)]
        assert lora and all("_cast_input_dtype" not in m.__dict__ for m in lora)  # PEFT wrapped after prepare()
        trainer.train()
        assert all("_cast_input_dtype" in m.__dict__ for m in lora)
    finally:
        stack.undo()
    assert all("_cast_input_dtype" not in m.__dict__ for m in lora)
    model = with_lora(make_model(tok, layers=1))
    with sft_plugins.compose([NAME], options={NAME: {"lean_lora_cast": False}}) as stack:
        stack.prepare(model=model)
        assert all("_cast_input_dtype" not in m.__dict__ for m in _lora_layers(model))
