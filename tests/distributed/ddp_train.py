"""Run under `torchrun --nproc_per_node 2`: train a few steps with a stack on CPU (gloo) and write, per
rank, the logged losses and a checksum of the trained parameters to OUT_DIR/rank<k>.json.

    ddp_train.py OUT_DIR plugin+plugin [lora]      # lora: LoRA on all linear layers through peft_config"""

import json
import os
import sys

import torch
from gloo_exit import exit_without_finalization  # beside this script
from trl import SFTConfig, SFTTrainer

import sft_plugins
from sft_plugins.embedded import build_dataset, build_model, build_tokenizer

out_dir, names = sys.argv[1], [n for n in sys.argv[2].split("+") if n]
lora = sys.argv[3:] == ["lora"]
rank = int(os.environ.get("RANK", "0"))
tok = build_tokenizer()
model = build_model(tokenizer=tok)
args = SFTConfig(output_dir=out_dir, max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, max_length=128,
                 bf16=False, use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no",
                 logging_steps=1, seed=0, dataloader_num_workers=0)
kwargs = {}
if lora:
    from peft import LoraConfig

    kwargs["peft_config"] = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
with sft_plugins.compose(names) as stack:
    trainer = SFTTrainer(**stack.prepare(model=model, args=args, train_dataset=build_dataset(64),
                                         processing_class=tok, **kwargs))
    trainer.train()
    fused = len(getattr(stack.state_of("fused_lora"), "layers", [])) if "fused_lora" in names else None
params = torch.cat([p.detach().flatten().double() for p in trainer.model.parameters()])
record = {"rank": rank, "world_size": trainer.args.world_size, "names": names,
          "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log],
          "param_sum": float(params.sum()), "param_sq": float((params ** 2).sum()), "fused_lora_layers": fused}
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
exit_without_finalization()  # the record is on disk by now
