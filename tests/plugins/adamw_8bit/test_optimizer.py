"""adamw_8bit's optimizer (``adamw_8bit/optimizer.py``): Trainer's own param grouping and hyperparameters reach
the 8-bit optimizer; state is <= 2.1 bytes/param for large tensors (measured from the state tensors) and
32-bit for embeddings and lm_head; the sync-free step equals bitsandbytes' own (bit for bit, or to rounding
with the Triton kernel)."""

from __future__ import annotations

import pytest

import sft_plugins
from sft_plugins.embedded import build_model

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

from sft_plugins.plugins import adamw_8bit  # noqa: E402
from sft_plugins.plugins.adamw_8bit.optimizer import optimizer_classes  # noqa: E402

from .helpers import options, sft_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_param_groups_and_hyperparameters_equal_trainers(tmp_path, tok):
    from transformers import Trainer

    model = build_model(tokenizer=tok)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # only trainable params
    args = sft_args(tmp_path, learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                    weight_decay=0.1)
    with sft_plugins.compose(["adamw_8bit"]) as stack:
        kwargs = stack.prepare(model=model, args=args)
        ours = Trainer(model=model, args=kwargs["args"],
                       optimizer_cls_and_kwargs=kwargs["optimizer_cls_and_kwargs"]).create_optimizer()
    reference = Trainer(model=model, args=args).create_optimizer()  # torch AdamW, Trainer's own groups

    assert isinstance(ours, bnb.optim.AdamW8bit) and not isinstance(ours, bnb.optim.PagedAdamW8bit)
    assert len(ours.param_groups) == len(reference.param_groups) == 2
    for mine, theirs in zip(ours.param_groups, reference.param_groups):
        assert [id(p) for p in mine["params"]] == [id(p) for p in theirs["params"]]
        for key in ("lr", "weight_decay", "eps"):
            assert mine[key] == theirs[key], key
        assert tuple(mine["betas"]) == tuple(theirs["betas"]) == (0.8, 0.95)
    decay, no_decay = ours.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    frozen = model.model.layers[0].self_attn.q_proj.weight
    assert all(p is not frozen for g in ours.param_groups for p in g["params"])


def test_state_bytes_per_param_and_fp32_embeddings(tmp_path, tok):
    from transformers import Trainer

    # wide MLP: 64x2048 = 131k-element matrices are the "large tensors"
    model = build_model(tokenizer=tok, intermediate_size=2048)
    with sft_plugins.compose(["adamw_8bit"]) as stack:
        kwargs = stack.prepare(model=model, args=sft_args(tmp_path))
        opt = Trainer(model=model, args=kwargs["args"],
                      optimizer_cls_and_kwargs=kwargs["optimizer_cls_and_kwargs"]).create_optimizer()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt.step()

    summary = adamw_8bit.state_bytes(opt)
    assert summary["params_8bit"] > 0.7 * summary["params_with_state"] - 2 * 512 * 64
    assert summary["bytes_per_param_8bit"] <= 2.1, summary
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed is not head  # the tiny preset is untied: both rules are exercised
    for name, p in model.named_parameters():
        state = opt.state[p]
        own = sum(t.untyped_storage().nbytes() for k, t in state.items()
                  if isinstance(t, torch.Tensor) and not k.startswith("qmap"))
        if p is embed or p is head:
            assert state["state1"].dtype == torch.float32 and own / p.numel() == 8.0, name
        elif p.numel() >= 65536:
            assert state["state1"].dtype == torch.uint8, name
            assert own / p.numel() <= 2.1, (name, own / p.numel())
        elif p.numel() < 4096:
            assert state["state1"].dtype == torch.float32, name  # bitsandbytes' min_8bit_size


def test_fp32_embeddings_can_be_turned_off(tmp_path, tok):
    model = build_model(tokenizer=tok)
    opts = options(fp32_embeddings=False)
    cls, kwargs = adamw_8bit.sft_optimizer_cls_and_kwargs(model=model, args=sft_args(tmp_path), options=opts)
    assert kwargs["fp32_params"] == [] and kwargs["kernel"] == "triton" and kwargs["min_8bit_size"] == 4096
    opt = cls(model.parameters(), **kwargs)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    assert opt.state[model.get_input_embeddings().weight]["state1"].dtype == torch.uint8
    assert adamw_8bit.sft_callbacks(args=None, options=opts) == []


def test_paged_option_selects_paged_class(tmp_path, tok):
    model = build_model(tokenizer=tok)
    cls, kwargs = adamw_8bit.sft_optimizer_cls_and_kwargs(model=model, args=sft_args(tmp_path),
                                                          options=options(paged=True))
    assert issubclass(cls, bnb.optim.PagedAdamW8bit) and cls is optimizer_classes()[True]
    assert cls(model.parameters(), **kwargs).is_paged
    if not torch.cuda.is_available():  # on CPU bitsandbytes would quietly un-page: refused instead
        with pytest.raises(sft_plugins.PluginError, match="paged"):
            sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"paged": True}}).prepare(
                model=model, args=sft_args(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_bf16_step(tmp_path, tok, paged):
    from transformers import Trainer, TrainingArguments

    model = build_model(tokenizer=tok, intermediate_size=2048, dtype=torch.bfloat16).cuda()
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, report_to="none", learning_rate=1e-3)
    with sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"paged": paged}}) as stack:
        opt = Trainer(**stack.prepare(model=model, args=args)).create_optimizer()
    assert opt.is_paged == paged
    ids = torch.randint(0, len(tok), (2, 32), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    opt.step()
    torch.cuda.synchronize()
    up = model.model.layers[0].mlp.up_proj.weight
    assert opt.state[up]["state1"].dtype == torch.uint8 and not torch.equal(before, up.detach())
    assert opt.state[model.get_input_embeddings().weight]["state1"].dtype == torch.float32
    assert adamw_8bit.state_bytes(opt)["bytes_per_param_8bit"] <= 2.1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["bitsandbytes", "triton"])
def test_step_without_per_parameter_syncs_equals_bitsandbytes(device, dtype, kernel, request):
    """Our non-paged step drops bitsandbytes' per-parameter device syncs and, on CUDA, its Python path
    to the kernels (direct calls): same updates, bit for bit, with a learning rate changing per step;
    with the Triton 8-bit kernel (CUDA only) the same to rounding."""
    torch.manual_seed(0)
    shapes = [(64, 128), (4096,), (128, 64), (32,)]  # 8-bit and (small) 32-bit state tensors
    ours_params = [torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    ref_params = [p.detach().clone().requires_grad_(True) for p in ours_params]
    cls = optimizer_classes()[False]
    ours = cls(ours_params, lr=1e-2, weight_decay=0.01, fp32_params=[ours_params[2]], kernel=kernel)
    ref = bnb.optim.AdamW8bit(ref_params, lr=1e-2, weight_decay=0.01)
    # bitsandbytes' manager is a process-wide singleton keyed by id(param): start and end it clean, or an
    # override left by another test (a recycled id) would reach one of these parameters
    ref.mng.pid2config.clear()
    ref.mng.index2config.clear()
    request.addfinalizer(ref.mng.pid2config.clear)
    ref.mng.override_config(ref_params[2], "optim_bits", 32)
    generic_calls = []
    generic = ours.update_step
    ours.update_step = lambda *a: (generic_calls.append(a), generic(*a))
    for step in range(3):
        for opt in (ours, ref):
            opt.param_groups[0]["lr"] = 1e-2 / (step + 1)
        for a, b in zip(ours_params, ref_params):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    if kernel == "bitsandbytes" or device == "cpu":
        for a, b in zip(ours_params, ref_params):
            assert torch.equal(a, b)
        for a, b in zip(ours_params, ref_params):
            for key, value in ref.state[b].items():
                assert torch.equal(torch.as_tensor(ours.state[a][key]), torch.as_tensor(value)), key
    else:  # our Triton 8-bit step: bitsandbytes' arithmetic to rounding, its state format
        for a, b in zip(ours_params, ref_params):
            torch.testing.assert_close(a, b, rtol=2e-6 if dtype == torch.float32 else 2**-7,
                                       atol=1e-6 if dtype == torch.float32 else 1e-7)
            for key in ("state1", "state2"):
                diff = (ours.state[a][key].int() - ref.state[b][key].int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-2, key
    # on CUDA every update went through the direct kernel call; elsewhere through bitsandbytes' own
    assert len(generic_calls) == (0 if device == "cuda" else 3 * len(shapes))
    assert ours.state[ours_params[0]]["state1"].dtype == torch.uint8
    assert ours.state[ours_params[2]]["state1"].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_8bit_updates_go_out_in_one_grouped_launch_per_step(monkeypatch):
    """A LoRA-like set of many small 8-bit tensors: each step hands all of them to one grouped launch (not
    one launch per tensor), and the result equals the one-tensor kernel's, bit for bit."""
    from sft_plugins.kernels import adam8bit_blockwise_step_
    from sft_plugins.plugins.adamw_8bit import optimizer as optimizer_module

    torch.manual_seed(0)
    params = [torch.randn(16, 512 + 64 * i, device="cuda", requires_grad=True) for i in range(24)]
    opt = optimizer_classes()[False](params, lr=1e-3, weight_decay=0.01, kernel="triton")
    launches = []
    real = optimizer_module._launch_grouped
    monkeypatch.setattr(optimizer_module, "_launch_grouped",
                        lambda kernels, grouped: (launches.extend(len(u) for _, _, u in grouped.values()),
                                                  real(kernels, grouped)))
    for p in params:
        p.grad = torch.randn_like(p) * 0.1
    opt.step()  # creates the state, then steps
    assert launches == [len(params)]
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)})
              for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 0.1
    opt.step()
    assert launches == [len(params)] * 2
    for p, (p0, st) in zip(params, before):  # the same step, one tensor at a time
        adam8bit_blockwise_step_(p0, p.grad, st["state1"], st["state2"], st["qmap1"], st["qmap2"], st["absmax1"],
                                 st["absmax2"], beta1=0.9, beta2=0.999, eps=1e-8, step=2, lr=1e-3, weight_decay=0.01)
        assert torch.equal(p0, p.detach()) and torch.equal(st["state1"], opt.state[p]["state1"])
