"""Helpers of the smart_checkpointing tests: tiny models, a manual SGD loop returning per-step losses and the
last gradients, the exactness check, an SFTTrainer factory, and the GPU bf16 LoRA backward-peak probe.

CPU tests run the whole save/restore machinery with ``offload="always"`` (CPU tensors copied through the
host pool), so everything but the CUDA streams is exercised without a GPU; GPU tests use ``needs_cuda``.
"""

from __future__ import annotations

import pytest
import torch

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model
from sft_plugins.plugins import smart_checkpointing as sc

NAME = "smart_checkpointing"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def make_model(tok, layers: int = 3, dropout: float = 0.0, device: str = "cpu", dtype=torch.float32):
    model = build_model("tiny", tokenizer=tok, num_hidden_layers=layers, attention_dropout=dropout,
                        dtype=dtype).to(device)
    model.train()
    return model


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(123)  # LoRA's A matrices are drawn from the global RNG
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def train(model, tok, *, steps: int = 20, seed: int = 0, device: str = "cpu"):
    """Manual SGD loop; returns per-step losses and the last step's gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)  # dropout draws
    losses, grads = [], {}
    for step in range(steps):
        length = 9 + (step * 7) % 23  # varying lengths: buffers must be reused and grown, not reallocated
        ids = torch.randint(0, len(tok), (2, length), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


def assert_same(a, b, tol: float = 1e-5):
    (la, ga), (lb, gb) = a, b
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert abs(x - y) <= tol * max(1.0, abs(x)), (la, lb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=tol, atol=tol, msg=name)


def run(tok, options=None, *, lora=False, dropout=0.0, layers=3, steps=20, device="cpu", collect=None):
    """Train a fresh model without the plugin (``options=None``) or with it; ``collect`` gets its stats."""
    model = make_model(tok, layers, dropout, device)
    if lora:
        model = with_lora(model)
    if options is None:
        return train(model, tok, steps=steps, device=device)
    with sft_plugins.compose([NAME], options={NAME: options}) as stack:
        stack.prepare(model=model)
        result = train(model, tok, steps=steps, device=device)
        if collect is not None:
            collect.update(sc.stats(model))
    return result


def sft(tok, names, *, args_kw=None, lora=True, model=None):
    """A prepared stack, the SFTTrainer built from it (20 steps, LoRA on all linears by default: the trainer's
    model is then a PeftModel around it) and the model given to prepare()."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**{**dict(output_dir="/tmp/sft_sc", bf16=False, use_cpu=True, report_to="none", max_steps=20,
                               per_device_train_batch_size=4, logging_steps=1, learning_rate=5e-3, save_strategy="no",
                               seed=0, max_length=64, dataloader_num_workers=0), **(args_kw or {})})
    model = model if model is not None else make_model(tok, layers=2)
    stack = sft_plugins.compose(names)
    kwargs = stack.prepare(model=model, args=args, train_dataset=build_dataset(80), processing_class=tok,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None)
    trainer = SFTTrainer(**kwargs)
    return stack, trainer, model


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def gpu_bf16_lora_backward(tok, options, tokens, inter, hidden):
    """Three bf16 LoRA steps on the GPU (Triton kernels, autocast off, bf16 weights): losses, backward peak."""
    torch.manual_seed(0)
    model = with_lora(build_model("tiny", tokenizer=tok, num_hidden_layers=2, intermediate_size=inter,
                                  hidden_size=hidden, dtype=torch.bfloat16).cuda())
    return gpu_backward_peaks(model, tok, options, tokens)


def gpu_backward_peaks(model, tok, options, tokens, autocast=False):
    """Three steps of ``model`` on the GPU with the plugin (``offload: never`` and ``options``) on one row of
    ``tokens`` ids: the losses and the highest backward peak above the memory held before it."""
    model.train()
    ids = torch.randint(0, len(tok), (1, tokens), generator=torch.Generator().manual_seed(1)).cuda()
    losses, peaks = [], []
    with sft_plugins.compose([NAME], options={NAME: {"offload": "never", **options}}) as stack:
        stack.prepare(model=model)
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss.backward()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            losses.append(loss.item())
            model.zero_grad(set_to_none=True)
    return losses, max(peaks)
