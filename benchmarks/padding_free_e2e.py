"""padding_free / packing+padding_free vs TRL padding_free and TRL BFD packing, end to end (LoRA SFT).

The reference workload the peers were compared on (as in ``end_to_end.py``), reproduced in the same
run: a random-initialised Llama-3.2-1B-shaped model in bf16 (``build_model(
"llama-3.2-1b-shape", tokenizer=tok, dtype=torch.bfloat16)``, sdpa), LoRA r16 on all linear layers,
batch 8, 4000 pre-tokenised examples with lognormal lengths (mean ~442, clipped to [24, 2048]), TRL
1.16 defaults otherwise (its fused LM head, gradient checkpointing, bf16), 16 steps timed over steps
4-16 (``--steps/--warmup``). Every arm runs in its own subprocess (patches are process-global):

- ``trl_padding_free``: ``SFTConfig(padding_free=True, max_length=None)``.
- ``trl_packing_bfd``: ``SFTConfig(packing=True)`` (BFD, rows of 2048; padding-free collator; sdpa
  builds a dense block-diagonal mask for each 16k-token row).
- ``ours_padding_free``: ``compose(["padding_free"])``: our flattening collator + varlen attention.
- ``ours_packing_padding_free``: ``compose(["packing", "padding_free"])``: our BFD rows of 2048.

Figures: real (non-pad) tokens/s from TRL's ``num_tokens`` log (the same counter for every arm), s/step,
tokens/step, peak allocated GPU memory, final loss. A first child checks on the GPU that each packed
attention backend gives each sequence the loss it gets alone, and times one attention layer (fwd+bwd)
over a packed 16k-token row: dense-mask sdpa vs varlen vs FlexAttention vs a per-sequence loop.

    # H200, one command (~4-5 min); JSON to --out, markdown table on stdout
    python benchmarks/padding_free_e2e.py --out benchmarks/results/padding_free_e2e_h200.json
    # CPU check of the script itself (tiny model, short sequences, no GPU figures)
    python benchmarks/padding_free_e2e.py --smoke --out /tmp/padding_free_e2e_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import _common  # benchmarks/_common.py: puts the checkout on sys.path

ROOT = _common.ROOT

BATCH, MAXLEN = 8, 2048
TARGET_SPEEDUP = 1.5
CONFIGS: dict[str, dict[str, Any]] = {
    "trl_padding_free": {"trl": {"padding_free": True, "max_length": None}, "ours": []},
    "trl_packing_bfd": {"trl": {"packing": True}, "ours": []},
    "ours_padding_free": {"trl": {}, "ours": ["padding_free"]},
    "ours_packing_padding_free": {"trl": {}, "ours": ["packing", "padding_free"]},
}


def versions() -> dict[str, str | None]:
    return _common.versions(("torch", "transformers", "trl", "peft", "accelerate", "datasets", "triton"))


def dataset(n: int, maxlen: int, vocab: int, seed: int = 0):
    """The reference workload's data (``sft_plugins.embedded.build_token_dataset``'s lengths, ids in
    [100, vocab - 2)) and its mean length."""
    from sft_plugins.embedded import build_token_dataset

    ds = build_token_dataset(n, maxlen, vocab, seed, low_id=100, high_id=vocab - 2)
    return ds, sum(map(len, ds["input_ids"])) / n


def tokenizer(vocab: int):
    """The reference workload's word-level tokenizer: every id is a token, pad and eos at the top."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    v = {f"t{i}": i for i in range(vocab - 2)}
    v["<pad>"], v["<eos>"] = vocab - 2, vocab - 1
    tk = Tokenizer(models.WordLevel(v, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="t0")


def _settings(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {"preset": "tiny", "vocab": 512, "n": 200, "maxlen": 256, "batch": 4}
    return {"preset": "llama-3.2-1b-shape", "vocab": 128256, "n": 4000, "maxlen": MAXLEN, "batch": BATCH}


# -- child: one training arm ------------------------------------------------------------------------
def child_train(name: str, smoke: bool, steps: int, warmup: int, attention: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import sft_plugins
    from sft_plugins.embedded import build_model
    from sft_plugins.plugins import packing, padding_free
    from sft_plugins.plugins.padding_free import attention as packed_attention

    s = _settings(smoke)
    cuda = torch.cuda.is_available() and not smoke
    tok = tokenizer(s["vocab"])
    model = build_model(s["preset"], tokenizer=tok, dtype=torch.bfloat16 if cuda else torch.float32,
                        max_position_embeddings=8192)
    if cuda:
        model = model.cuda()
    ds, mean_len = dataset(s["n"], s["maxlen"], s["vocab"])

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())

    cfg = CONFIGS[name]
    timer = Timer()
    args = SFTConfig(output_dir=f"/tmp/pf_e2e_{name}", per_device_train_batch_size=s["batch"], max_steps=steps,
                     learning_rate=2e-4, logging_steps=1, report_to="none", bf16=cuda, use_cpu=not cuda,
                     save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     **{"max_length": s["maxlen"], **cfg["trl"]})
    peft_config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    # local plugins: the GPU machine runs from a checkout (PYTHONPATH), without our entry points
    options = {"padding_free": {"attention": attention}} if "padding_free" in cfg["ours"] else None
    stack = sft_plugins.compose(cfg["ours"], options=options,
                                plugins={"padding_free": padding_free, "packing": packing})
    kw = stack.prepare(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                       callbacks=[timer])
    attention = model.config._attn_implementation
    trainer = SFTTrainer(**kw)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    sdpa_calls = packed_attention.sdpa_calls(model)  # counted on the layers until undo
    stack.undo()
    logs = [r for r in trainer.state.log_history if "num_tokens" in r]
    tok_counts = [r["num_tokens"] for r in logs]
    dt = timer.t[-1] - timer.t[warmup - 1]
    dtok = tok_counts[-1] - tok_counts[warmup - 1]
    out = {"config": name, "tokens_per_s": round(dtok / dt, 1), "s_per_step": round(dt / (steps - warmup), 4),
           "tokens_per_step": round(dtok / (steps - warmup), 1),
           "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "final_loss": logs[-1].get("loss"), "mean_len": round(mean_len, 1), "attn_implementation": attention,
           "packed_backend": (attention or "").removeprefix("sft_packed_") if (attention or "").startswith("sft_packed_")
           else None,
           "sdpa_fallback_calls": sdpa_calls,
           "backend_errors": {k: v for k, v in packed_attention.KERNEL_PROBES.items() if v}}
    rows = getattr(stack.state_of("packing"), "train_rows", None)
    if rows is not None:
        out["packing_stats"] = rows.stats
    return out


# -- child: GPU correctness of each backend + one-layer attention timing ----------------------------
def child_check(smoke: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import sft_plugins
    from sft_plugins.embedded import build_model, build_tokenizer
    from sft_plugins.plugins.padding_free import attention as pa
    from sft_plugins.plugins import padding_free
    from sft_plugins.plugins.shared import PackedCollator

    cuda = torch.cuda.is_available() and not smoke
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    out: dict[str, Any] = {"varlen_available": pa.varlen_available()}
    if pa.varlen_available():
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        out["varlen_signature"] = str(inspect.signature(varlen_attn))
    tok = build_tokenizer()
    texts = ["Copy: apple river stone\napple river stone", "Add 3 and 4.\n7", "Sort: 5 3 9 1 7\n1 3 5 7 9"]
    samples = [tok(t)["input_ids"] for t in texts]
    model = build_model(tokenizer=tok, dtype=dtype).to(dev)
    with torch.no_grad():
        alone = []
        for s_ in samples:
            ids = torch.tensor(s_, device=dev)
            alone.append(F.cross_entropy(model(input_ids=ids[None], use_cache=False).logits[0, :-1].float(), ids[1:],
                                         reduction="none"))
    batch = PackedCollator(pad_token_id=tok.pad_token_id)([{"input_ids": s_} for s_ in samples])
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    cu = [0, *torch.tensor([len(s_) for s_ in samples]).cumsum(0).tolist()]
    backends = ["dense", "loop"] + (["varlen", "flex"] if cuda else [])
    parity = {}
    for backend in backends:
        try:
            with sft_plugins.compose(["padding_free"], options={"padding_free": {"attention": backend}},
                                     plugins={"padding_free": padding_free}) as stack:
                stack.prepare(model=model)
                with torch.no_grad():
                    logits = model(**batch, use_cache=False).logits[0]
            diffs = [float((F.cross_entropy(logits[a:b - 1].float(), batch["input_ids"][0, a + 1:b], reduction="none")
                            - ref).abs().max()) for (a, b), ref in zip(zip(cu[:-1], cu[1:]), alone)]
            parity[backend] = {"max_abs_loss_diff_vs_alone": max(diffs)}
        except Exception as exc:  # report, keep going: the table says which backend failed and why
            parity[backend] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    # scale for the figures above: the contaminated row (all-ones mask next to packed position_ids)
    with torch.no_grad():
        logits = model(**batch, attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False).logits[0]
    parity["contaminated_all_ones_mask_for_scale"] = {"max_abs_loss_diff_vs_alone": max(
        float((F.cross_entropy(logits[a:b - 1].float(), batch["input_ids"][0, a + 1:b], reduction="none") - ref)
              .abs().max()) for (a, b), ref in zip(zip(cu[:-1], cu[1:]), alone))}
    out["parity_vs_alone"] = parity
    out["attention_layer_ms"] = _time_attention(cuda)
    return out


def _time_attention(cuda: bool) -> dict[str, Any]:
    """One Llama-3.2-1B attention (32 q / 8 kv heads, d 64), fwd+bwd, one packed row of 42 samples."""
    import torch

    from sft_plugins.plugins.padding_free import attention as pa

    if not cuda:
        return {"skipped": "no CUDA"}
    torch.manual_seed(0)
    lens = torch.distributions.LogNormal(5.8, 0.8).sample((200,)).clamp(24, 2048).long()
    lens = lens[lens.cumsum(0) <= 16384][:42]
    total = int(lens.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32).cuda()
    ml = int(lens.max())
    pos = torch.cat([torch.arange(int(n)) for n in lens])[None].cuda()
    q = torch.randn(1, 32, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, total, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    doc = torch.repeat_interleave(torch.arange(lens.numel(), device="cuda"), lens.cuda())
    dense_mask = (doc[:, None] == doc[None, :]) & torch.ones(total, total, device="cuda", dtype=torch.bool).tril()

    def dense():
        kk, vv = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=dense_mask[None, None])

    fns = {"sdpa_dense_mask": dense,
           "loop": lambda: pa._run_loop(q, k, v, cu, None)}
    if pa.varlen_available():
        fns["varlen"] = lambda: pa._run_varlen(q, k, v, cu, ml, None)
    if pa.flex_available():
        fns["flex"] = lambda: pa._run_flex(q, k, v, cu, None)
    res: dict[str, Any] = {"tokens": total, "samples": int(lens.numel())}
    for name, fn in fns.items():
        try:
            for _ in range(3):  # warm-up (flex compiles here)
                fn().float().sum().backward()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn().float().sum().backward()
            end.record()
            torch.cuda.synchronize()
            res[name] = round(start.elapsed_time(end) / 10, 3)
        except Exception as exc:
            res[name] = f"error: {type(exc).__name__}: {exc}"[:300]
        pa._flex_mask._ref = None  # a fresh mask per backend run; the cu tensor is the same object
    del pos
    return res


# -- parent -----------------------------------------------------------------------------------------
def _run_child(argv: list[str], timeout: float) -> dict[str, Any]:
    # imported here: _e2e_arms.py imports this module for its tokenizer, also in Unsloth's child
    from sft_plugins.ablate._runner import run_arm_subprocess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run = run_arm_subprocess([sys.executable, __file__, *argv], timeout, env=env)
    if run["timed_out"]:
        return {"error": f"timed out after {timeout:.0f} s"}
    if run["result"] is not None:
        return run["result"]
    tail = (run["stderr"] or run["stdout"] or "").strip().splitlines()[-6:]
    return {"error": " | ".join(tail)[:1200]}


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| config | s/step | real tokens/step | real tokens/s | peak GiB | final loss | attention |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | error: {r['error'][:200]} | | | | | |")
            continue
        attn = r.get("attn_implementation") + (f" ({r['packed_backend']})" if r.get("packed_backend") else "")
        rows.append(f"| {r['config']} | {r['s_per_step']:.3f} | {r['tokens_per_step']:,.0f} | "
                    f"{r['tokens_per_s']:,.0f} | {r['peak_GiB']} | {r['final_loss']} | {attn} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script itself")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--no-check", action="store_true", help="skip the backend parity / attention timing child")
    ap.add_argument("--attention", default=None,
                    help="padding_free attention option for our arms (default: auto; loop with --smoke, so the "
                         "CPU check runs our AttentionInterface path through SFTTrainer + LoRA)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    steps = a.steps or (4 if a.smoke else 16)
    warmup = a.warmup or (1 if a.smoke else 4)
    attention = a.attention or ("loop" if a.smoke else "auto")

    if a.child:
        res = child_check(a.smoke) if a.child == "check" else child_train(a.child, a.smoke, steps, warmup, attention)
        print("RESULT " + json.dumps(res), flush=True)
        return

    t0 = time.time()
    common = (["--smoke"] if a.smoke else []) + ["--steps", str(steps), "--warmup", str(warmup),
                                                 "--attention", attention]
    out: dict[str, Any] = {"command": "python " + " ".join(shlex.quote(x) for x in sys.argv), "versions": versions(),
                           "smoke": a.smoke, "workload": {"steps": steps, "timed_from_step": warmup, **_settings(a.smoke),
                                                          "lora": "r16 all-linear", "attn": "sdpa",
                                                          "ours_attention_option": attention}}
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        out["gpu"] = None
    if not a.no_check:
        out["check"] = _run_child(["--child", "check", *common], timeout=240)
        print(json.dumps({"check": out["check"]}), flush=True)
    results = []
    for name in a.configs.split(","):
        res = {"config": name, **_run_child(["--child", name, *common], timeout=420)}
        results.append(res)
        print(json.dumps(res), flush=True)
    out["results"] = results
    by = {r["config"]: r for r in results if "error" not in r}
    ref, ours = by.get("trl_packing_bfd"), by.get("ours_packing_padding_free")
    if ref and ours:
        speedup = ours["tokens_per_s"] / ref["tokens_per_s"]
        mem_ok = None if ref["peak_GiB"] is None else ours["peak_GiB"] <= ref["peak_GiB"]
        out["target"] = {"speedup_vs_trl_bfd": round(speedup, 3), "target": TARGET_SPEEDUP,
                         "memory_le_trl_bfd": mem_ok, "met": bool(speedup >= TARGET_SPEEDUP and mem_ok)}
    if by.get("trl_padding_free") and by.get("ours_padding_free"):
        out["padding_free_speedup_vs_trl_padding_free"] = round(
            by["ours_padding_free"]["tokens_per_s"] / by["trl_padding_free"]["tokens_per_s"], 3)
    out["wall_s"] = round(time.time() - t0, 1)
    md = table(results)
    out["markdown"] = md
    print(md)
    if "target" in out:
        print(f"\nours packing+padding_free vs TRL BFD packing: {out['target']['speedup_vs_trl_bfd']}x tokens/s "
              f"(target {TARGET_SPEEDUP}x), memory <= TRL BFD: {out['target']['memory_le_trl_bfd']}"
              + (" [smoke: tiny model on a shared CPU, our arms on the slow 'loop' path; not a measurement]"
                 if a.smoke else ""))
    if "check" in out:
        print("backend parity vs alone:", json.dumps(out["check"].get("parity_vs_alone")))
        print("one attention layer fwd+bwd, ms:", json.dumps(out["check"].get("attention_layer_ms")))
    print(f"wall {out['wall_s']} s")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
