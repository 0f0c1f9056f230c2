"""adamw_8bit in SFTTrainer: 200 steps converge within 2% of torch AdamW, a checkpoint resumes bit-for-bit,
the train-begin callback finds embeddings PEFT created after prepare(), and no process-global bitsandbytes
state is left behind."""

from __future__ import annotations

import statistics

import pytest

import sft_plugins
from sft_plugins.embedded import build_model

bnb = pytest.importorskip("bitsandbytes")
torch = pytest.importorskip("torch")

from sft_plugins.plugins import adamw_8bit  # noqa: E402
from sft_plugins.plugins.adamw_8bit.optimizer import find_optimizer  # noqa: E402

from .helpers import sft_args, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


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
    opt = find_optimizer(trainer.optimizer)
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
    opt = find_optimizer(trainer.optimizer)
    heads = [p for n, p in trainer.model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert heads and all(opt.state[p]["state1"].dtype == torch.float32 for p in heads)


def test_undo_leaves_no_global_state(tmp_path, tok, dataset):
    mng = bnb.optim.GlobalOptimManager.get_instance()
    before = (dict(mng.pid2config), dict(mng.index2config), list(mng.module_weight_config_triple))
    train(["adamw_8bit"], tmp_path, tok, dataset, max_steps=2)
    assert (dict(mng.pid2config), dict(mng.index2config), list(mng.module_weight_config_triple)) == before
