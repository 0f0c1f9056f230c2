"""adamw_8bit: bitsandbytes 8-bit AdamW through ``optimizer_cls_and_kwargs`` (bitsandbytes steps on CPU).

What is held: Trainer's own param grouping and hyperparameters reach the 8-bit optimizer; state is
<= 2.1 bytes/param for large tensors (measured from the state tensors) and 32-bit for embeddings and
lm_head; 200 steps converge within 2% of torch AdamW; a checkpoint resumes bit-for-bit; every
unsupported setup raises PluginError naming the fix; undo leaves no global state behind.
"""

from __future__ import annotations

import copy
import statistics
import subprocess
import sys
from typing import Any

import pytest

import sft_plugins
from sft_plugins import PluginError
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

from sft_plugins.plugins import adamw_8bit  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # bitsandbytes' CPU path is many small torch ops per tensor; with two intra-op threads on a shared
    # 2-core machine every op waits at a barrier for a busy core (measured 3-10x slower under load)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    # short samples: the tiny task stays learnable and each step costs milliseconds
    return build_dataset(256, form="prompt_completion", max_words=12)


def sft_args(tmp_path, **overrides: Any):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, bf16=False, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=1, max_length=64, learning_rate=2e-3,
                weight_decay=0.01, seed=0, gradient_checkpointing=False, disable_tqdm=True,
                lr_scheduler_type="constant")
    return SFTConfig(**{**base, **overrides})


def loss_recorder():
    """A callback that collects the per-step training losses the Trainer logs."""
    from transformers import TrainerCallback

    class LossRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return LossRecorder()


def train(names, tmp_path, tok, dataset, *, options=None, resume=None, model=None, **overrides):
    from trl import SFTTrainer

    model = model if model is not None else build_model(tokenizer=tok)
    stack = sft_plugins.compose(names, options=options)
    rec = loss_recorder()
    kwargs = stack.prepare(model=model, args=sft_args(tmp_path, **overrides), train_dataset=dataset,
                           processing_class=tok, callbacks=[rec])
    try:
        trainer = SFTTrainer(**kwargs)
        trainer.train(resume_from_checkpoint=resume)
    finally:
        stack.undo()
    return rec.losses, trainer


# -- the optimizer Trainer builds ------------------------------------------------------------------

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
    cls, kwargs = adamw_8bit.sft_optimizer_cls_and_kwargs(model=model, args=sft_args(tmp_path),
                                                          options={"fp32_embeddings": False})
    opt = cls(model.parameters(), **kwargs)
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    assert opt.state[model.get_input_embeddings().weight]["state1"].dtype == torch.uint8
    assert adamw_8bit.sft_callbacks(args=None, options={"fp32_embeddings": False}) == []


def test_paged_option_selects_paged_class(tmp_path, tok):
    model = build_model(tokenizer=tok)
    cls, kwargs = adamw_8bit.sft_optimizer_cls_and_kwargs(model=model, args=sft_args(tmp_path),
                                                          options={"paged": True})
    assert issubclass(cls, bnb.optim.PagedAdamW8bit)
    assert cls(model.parameters(), **kwargs).is_paged
    if not torch.cuda.is_available():  # on CPU bitsandbytes would quietly un-page: refused instead
        with pytest.raises(PluginError, match="paged"):
            sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"paged": True}}).prepare(
                model=model, args=sft_args(tmp_path))


# -- training ------------------------------------------------------------------------------------

def test_converges_like_torch_adamw(tmp_path, tok, dataset):
    steps = 200
    base, _ = train([], tmp_path / "base", tok, dataset, max_steps=steps)
    ours, trainer = train(["adamw_8bit"], tmp_path / "8bit", tok, dataset, max_steps=steps)
    assert len(base) == len(ours) == steps
    assert base[steps] < 0.7 * base[1]  # it learned something
    rel_final = abs(ours[steps] - base[steps]) / base[steps]
    tail = lambda losses: statistics.mean(losses[s] for s in range(steps - 9, steps + 1))  # noqa: E731
    rel_tail = abs(tail(ours) - tail(base)) / tail(base)
    assert rel_final <= 0.02 and rel_tail <= 0.02, (rel_final, rel_tail)
    assert ours != base  # a different optimizer really ran
    summary = adamw_8bit.state_bytes(trainer.optimizer)
    assert summary["params_8bit"] > 0 and summary["bytes_per_param_8bit"] <= 2.1


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, tok, dataset):
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full, _ = train(["adamw_8bit"], tmp_path / "full", tok, dataset, **kw)
    first, _ = train(["adamw_8bit"], tmp_path / "cut", tok, dataset, **kw)
    resumed, trainer = train(["adamw_8bit"], tmp_path / "cut", tok, dataset,
                             resume=str(tmp_path / "cut" / "checkpoint-3"), **kw)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed[step] - full[step]) <= 1e-5, (step, resumed[step], full[step])
    opt = adamw_8bit.find_optimizer(trainer.optimizer)
    assert opt.state[trainer.model.get_input_embeddings().weight]["state1"].dtype == torch.float32
    assert opt.state[trainer.model.model.layers[0].mlp.up_proj.weight]["state1"].dtype == torch.uint8


def test_callback_finds_embeddings_created_by_peft(tmp_path, tok, dataset):
    from peft import LoraConfig
    from trl import SFTTrainer

    # modules_to_save copies lm_head into a new trainable parameter after prepare(): only the
    # train-begin callback can know it
    model = build_model(tokenizer=tok, intermediate_size=2048)
    peft = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    with sft_plugins.compose(["adamw_8bit"]) as stack:
        kwargs = stack.prepare(model=model, args=sft_args(tmp_path, max_steps=1), train_dataset=dataset,
                               processing_class=tok, peft_config=peft)
        trainer = SFTTrainer(**kwargs)
        trainer.train()
    opt = adamw_8bit.find_optimizer(trainer.optimizer)
    heads = [p for n, p in trainer.model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert heads and all(opt.state[p]["state1"].dtype == torch.float32 for p in heads)


# -- refusals and undo ---------------------------------------------------------------------------

def test_refuses_user_optimizers(tmp_path, tok):
    model = build_model(tokenizer=tok)
    args = sft_args(tmp_path)
    with pytest.raises(PluginError, match="optimizers="):
        sft_plugins.compose(["adamw_8bit"]).prepare(
            model=model, args=args, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(PluginError, match="optimizer_cls_and_kwargs="):
        sft_plugins.compose(["adamw_8bit"]).prepare(
            model=model, args=args, optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1}))


@pytest.mark.parametrize("optim,fix", [("adafactor", "leave optim at its default"),
                                       ("paged_adamw_8bit", "paged")])
def test_refuses_other_optim(tmp_path, tok, optim, fix):
    with pytest.raises(PluginError, match=fix):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=build_model(tokenizer=tok),
                                                    args=sft_args(tmp_path, optim=optim))


def test_accepts_default_and_hf_8bit_optim(tmp_path, tok):
    for optim in ("adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"):
        with sft_plugins.compose(["adamw_8bit"]) as stack:
            out = stack.prepare(model=build_model(tokenizer=tok), args=sft_args(tmp_path, optim=optim))
            assert out["optimizer_cls_and_kwargs"][0].__name__ == "AdamW8bitFP32Embeddings"


def test_refuses_bad_options_and_missing_args(tok, tmp_path):
    model = build_model(tokenizer=tok)
    with pytest.raises(PluginError, match="unknown option"):
        sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"pagd": True}}).prepare(
            model=model, args=sft_args(tmp_path))
    with pytest.raises(PluginError, match="'kernel' must be one of"):
        sft_plugins.compose(["adamw_8bit"], options={"adamw_8bit": {"kernel": "cuda"}}).prepare(
            model=model, args=sft_args(tmp_path))
    with pytest.raises(PluginError, match="args="):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=model)
    args = copy.copy(sft_args(tmp_path))  # copy: no __post_init__, so no DeepSpeed import is needed
    args.deepspeed = "ds.json"
    assert any("DeepSpeed" in e for e in adamw_8bit.sft_check(args=args, options={}))


def test_refuses_missing_bitsandbytes(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(PluginError, match="pip install bitsandbytes"):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=build_model(tokenizer=tok), args=sft_args(tmp_path))


def test_refuses_bitsandbytes_that_cannot_run_here(tmp_path, tok, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, "optimizer_update_8bit_blockwise", broken)
    with pytest.raises(PluginError, match="cannot step AdamW8bit on cpu.*no kernel.*pip install -U bitsandbytes"):
        sft_plugins.compose(["adamw_8bit"]).prepare(model=build_model(tokenizer=tok), args=sft_args(tmp_path))


def test_undo_leaves_no_global_state(tmp_path, tok, dataset):
    mng = bnb.optim.GlobalOptimManager.get_instance()
    before = (dict(mng.pid2config), dict(mng.index2config), list(mng.module_weight_config_triple))
    train(["adamw_8bit"], tmp_path, tok, dataset, max_steps=2)
    assert (dict(mng.pid2config), dict(mng.index2config), list(mng.module_weight_config_triple)) == before


def test_describe_and_listing_without_torch():
    info = sft_plugins.available()["adamw_8bit"]
    assert info.ok and info.loss_parity is None and "8-bit" in info.summary
    code = ("import sys, sft_plugins.plugins.adamw_8bit; "
            "assert 'torch' not in sys.modules and 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


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
    cls = adamw_8bit.optimizer_classes()[False]
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
