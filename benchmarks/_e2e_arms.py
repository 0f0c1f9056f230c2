"""The children of ``benchmarks/end_to_end.py``: one training arm per process (patches are process-global).

    python benchmarks/_e2e_arms.py '{json spec}'     # prints one line ``RESULT {json}``

Kinds: ``trl`` (TRL 1.16 ``SFTTrainer``, unmodified; our plugins composed through ``stack.prepare``),
``unsloth`` (FastLanguageModel + Unsloth-patched TRL, run with Unsloth's own PYTHONPATH; the module
imports nothing but the standard library at top level, so ``unsloth`` is imported first), and
``save_model`` (writes the random-initialised model + tokenizer to a folder for Unsloth).

Measured identically in every arm, by a forward pre-hook on the trained model (what the model is
called with, whatever the collator) and a callback (``torch.cuda.synchronize`` at every step end):
- real tokens: input positions that are not padding, ``input_ids != pad_token_id`` (and inside a 2-D
  ``attention_mask`` when one is given; the synthetic data never contains the pad id);
- sequences and sum of squared sequence lengths: sequences are split at ``position_ids`` restarts
  (a packed / padding-free row) or are one per row (a padded batch); pads are not counted;
- loss tokens: ``labels[..., 1:] != -100``.

FLOPs per step (model FLOPs, for MFU; nothing counted for padding or for the recompute of
checkpointing, which is what MFU conventionally excludes):
    linear: LoRA  (4 * N_matmul + 6 * N_lora) * real_tokens   (frozen W: forward 2N, backward dX 2N, no dW)
            full  6 * N_matmul * real_tokens
    attention (causal, forward 2 L^2 D + backward 4 L^2 D per layer): 6 * n_layers * D * sum(L_i^2)
N_matmul = every linear weight of the decoder layers + the LM head (V x H, counted once when tied; the
embedding lookup is free); N_lora = r * (in + out) over q,k,v,o,gate,up,down of every layer; D =
n_heads * head_dim. MFU = FLOPs of the timed steps / timed seconds / 790e12 (H200 bf16 dense, measured).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from _e2e_profile import profile_summary

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEAK_FLOPS = 790e12
LORA_R = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def dataset(n: int, maxlen: int, vocab: int, seed: int = 0, fixed_len: int | None = None):
    """The reference workload's data: ``sft_plugins.embedded.build_token_dataset``'s lengths, ids in
    [100, 128000) (capped below the pad/eos ids for small vocabularies); ``fixed_len``: all that long."""
    from sft_plugins.embedded import build_token_dataset

    return build_token_dataset(n, maxlen, vocab, seed, low_id=100, high_id=min(128000, vocab - 2),
                               fixed_length=fixed_len)


def tokenizer(vocab: int):
    sys.path.insert(0, str(HERE))
    from padding_free_e2e import tokenizer as anchor_tokenizer  # the reference workload's word-level tokenizer

    return anchor_tokenizer(vocab)


def flops_model(cfg: Any, lora: bool) -> dict[str, Any]:
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    nq, nkv, vocab = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size
    d = getattr(cfg, "head_dim", None) or h // nq
    shapes = [(h, nq * d), (h, nkv * d), (h, nkv * d), (nq * d, h), (h, inter), (h, inter), (inter, h)]
    n_matmul = layers * sum(a * b for a, b in shapes) + vocab * h
    n_lora = layers * sum(LORA_R * (a + b) for a, b in shapes) if lora else 0
    per_token = 4 * n_matmul + 6 * n_lora if lora else 6 * n_matmul
    return {"n_matmul": n_matmul, "n_lora": n_lora, "linear_flops_per_token": per_token,
            "attention_flops_per_len_sq": 6 * layers * nq * d}


# -- measuring --------------------------------------------------------------------------------------
def make_meter(spec: dict[str, Any], pad_id: int):
    import torch
    from transformers import TrainerCallback

    cuda = spec["device"] == "cuda"
    steps, n_prof = spec["steps"], spec.get("profile_steps", 0) if spec.get("profile") else 0
    snapshot = cuda and bool(spec.get("memory_snapshot"))

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Meter(TrainerCallback):
        """Counts what the model is called with (no host sync: summed on the device, read at step end)."""

        def __init__(self) -> None:
            self.acc = None
            self.rows: list[dict[str, Any]] = []
            self.losses: dict[int, float] = {}
            self.batch_keys: dict[str, Any] | None = None
            self.last = 0.0
            self.prof = None
            self.memory: dict[str, Any] | None = None
            self.memory_base = 0
            self.pad_id = pad_id
            self.trainer = None  # set after construction: TRL's own num_tokens counter is recorded alongside

        def hook(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
            if not module.training:
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not torch.is_tensor(ids) or ids.dim() != 2:
                return
            if self.batch_keys is None:
                self.batch_keys = {k: list(v.shape) if torch.is_tensor(v) else type(v).__name__
                                   for k, v in kwargs.items()}
            b, t = ids.shape
            real = ids != self.pad_id
            mask = kwargs.get("attention_mask")
            if torch.is_tensor(mask) and mask.dim() == 2:
                real &= mask.bool()
            pos = kwargs.get("position_ids")
            start = torch.zeros_like(real)
            start[:, 0] = True
            if torch.is_tensor(pos) and pos.shape[-1] == t and pos.dim() == 2:
                pos = pos.expand(b, t)
                start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
            seg = start.reshape(-1).long().cumsum(0)
            lens = torch.zeros(b * t + 1, device=ids.device, dtype=torch.float64)
            lens.scatter_add_(0, seg, real.reshape(-1).double())
            labels = kwargs.get("labels")
            loss_tok = (labels[..., 1:] != -100).sum() if torch.is_tensor(labels) else real.sum() * 0
            vals = torch.stack([real.sum().double(), (lens * lens).sum(), (lens > 0).sum().double(),
                                loss_tok.double(), torch.tensor(float(ids.numel()), device=ids.device,
                                                                dtype=torch.float64)])
            self.acc = vals if self.acc is None else self.acc + vals

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.last = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if snapshot and state.global_step == steps - 1:
                sync()
                self.memory_base = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            if n_prof and state.global_step == steps and self.prof is None:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts, record_shapes=True)  # shapes: LoRA GEMMs
                self.prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            now = time.perf_counter()
            vals = [float(v) for v in self.acc.tolist()] if self.acc is not None else [0.0] * 5
            self.rows.append({"step": state.global_step, "time_s": now - self.last, "real_tokens": int(vals[0]),
                              "sum_len_sq": vals[1], "sequences": int(vals[2]), "loss_tokens": int(vals[3]),
                              "positions": int(vals[4]),
                              "trl_num_tokens_total": getattr(self.trainer, "_total_train_tokens", None)})
            self.acc, self.last = None, now
            if snapshot and state.global_step == steps:
                snap = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                self.memory = memory_peak_breakdown(snap, self.memory_base)
            if self.prof is not None and state.global_step == steps + n_prof:
                self.prof.__exit__(None, None, None)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return Meter()


def summarise(meter: Any, spec: dict[str, Any], fm: dict[str, Any], result: dict[str, Any]) -> None:
    steps, warmup = spec["steps"], spec["warmup"]
    rows = [r for r in meter.rows if r["step"] <= steps]
    timed = [r for r in rows if r["step"] > warmup]
    result["steps_done"] = len(rows)
    result["per_step"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]
    result["losses"] = [meter.losses.get(r["step"]) for r in rows]
    result["final_loss"] = result["losses"][-1] if rows else None
    result["batch_keys"] = meter.batch_keys
    result["pad_token_id"] = meter.pad_id
    if len(timed) < 1:
        return
    dt = sum(r["time_s"] for r in timed)
    tokens = sum(r["real_tokens"] for r in timed)
    flops = sum(fm["linear_flops_per_token"] * r["real_tokens"] + fm["attention_flops_per_len_sq"] * r["sum_len_sq"]
                for r in timed)
    n = len(timed)
    result.update(
        timed_steps=n, s_per_step=round(dt / n, 4), tokens_per_step=round(tokens / n, 1),
        tokens_per_s=round(tokens / dt, 1) if dt else None,
        loss_tokens_per_step=round(sum(r["loss_tokens"] for r in timed) / n, 1),
        trl_num_tokens_per_step=_trl_tokens(rows, warmup, steps),
        sequences_per_step=round(sum(r["sequences"] for r in timed) / n, 2),
        padding_fraction=round(1 - tokens / max(1, sum(r["positions"] for r in timed)), 4),
        model_tflops_per_s=round(flops / dt / 1e12, 2) if dt else None,
        mfu=round(flops / dt / PEAK_FLOPS, 4) if dt else None,
        attention_flops_share=round(sum(fm["attention_flops_per_len_sq"] * r["sum_len_sq"] for r in timed)
                                    / flops, 4) if flops else None,
        flops_model=fm)
    if meter.prof is not None:
        walls = [r["time_s"] for r in meter.rows if r["step"] > steps]
        result["profile"] = profile_summary(meter.prof, spec, walls, result["s_per_step"], LORA_R)
    if meter.memory is not None:
        result["memory_at_peak"] = meter.memory


def memory_peak_breakdown(snapshot: dict[str, Any], base_bytes: int, top: int = 30) -> dict[str, Any]:
    """Replays one recorded step of the caching allocator: the peak of allocated bytes within it and the
    tensors live at that moment (allocated during the step), grouped by the first frame of ours or of
    the HF stack that allocated them; ``base_bytes`` were live before the step (weights, optimizer state)."""
    trace = snapshot["device_traces"][0] if snapshot.get("device_traces") else []
    live: dict[int, dict[str, Any]] = {}
    cur = peak = 0
    peak_live: dict[int, dict[str, Any]] = {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, peak_live = cur, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]

    def where(ev: dict[str, Any]) -> str:
        frames = ev.get("frames") or []
        for keys in (("sft_plugins/",), ("peft/", "transformers/", "trl/", "benchmarks/")):
            for fr in frames:
                if any(k in fr.get("filename", "") for k in keys):
                    return f"{fr['filename'].split('site-packages/')[-1].split('/main/')[-1]}:{fr['line']} {fr['name']}"
        return frames[0]["name"] if frames else "?"

    groups: dict[str, list[int]] = {}
    for ev in peak_live.values():
        g = groups.setdefault(where(ev), [0, 0])
        g[0] += ev["size"]
        g[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"base_GiB": round(base_bytes / 2**30, 3), "step_peak_above_base_GiB": round(peak / 2**30, 3),
            "peak_GiB": round((base_bytes + peak) / 2**30, 3), "events": len(trace),
            "top": [{"where": k, "MiB": round(v[0] / 2**20, 1), "tensors": v[1]} for k, v in rows]}


def _trl_tokens(rows: list[dict[str, Any]], warmup: int, steps: int) -> float | None:
    """TRL's own num_tokens over the timed steps (attention_mask sum, or the row length when padding-free)."""
    by = {r["step"]: r.get("trl_num_tokens_total") for r in rows}
    a, b = by.get(warmup), by.get(steps)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or steps <= warmup:
        return None
    return round((b - a) / (steps - warmup), 1)


def _oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _memory(result: dict[str, Any], cuda: bool) -> None:
    if cuda:
        import torch

        result["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    else:
        result["peak_GiB"] = None


def _cap_memory(spec: dict[str, Any]) -> None:
    import torch

    cap = spec.get("mem_cap_gib")
    if cap and spec["device"] == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total))


def _train(trainer: Any, meter: Any, spec: dict[str, Any], fm: dict[str, Any], result: dict[str, Any]) -> None:
    import torch

    cuda = spec["device"] == "cuda"
    result["device_name"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    meter.trainer = trainer
    trainer.model.register_forward_pre_hook(meter.hook, with_kwargs=True)
    result["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result["attn_implementation"] = getattr(trainer.model.config, "_attn_implementation", None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        trainer.train()
        result["status"] = "ok"
    except Exception as exc:
        if not _oom(exc):
            raise
        result.update(status="OOM", error=f"{type(exc).__name__}: {exc}"[:600])
    result["train_s"] = round(time.perf_counter() - t0, 1)
    _memory(result, cuda)
    summarise(meter, spec, fm, result)


# -- the arms ---------------------------------------------------------------------------------------
def run_trl(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import torch
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    import sft_plugins
    from sft_plugins.embedded import build_model
    from sft_plugins.plugins import adamw_8bit, fused_ce, fused_lora, packing, padding_free, smart_checkpointing
    from sft_plugins.plugins.padding_free import attention as packed_attention

    w, cuda = spec["workload"], spec["device"] == "cuda"
    _cap_memory(spec)
    tok = tokenizer(w["vocab"])
    if w.get("quant"):
        model = load_4bit(spec["model_dir"], cuda)
    else:
        with torch.device("cuda") if cuda else contextlib.nullcontext():  # 1 s on the GPU, not ~20 s on the CPU
            model = build_model(w["preset"], tokenizer=tok, dtype=torch.bfloat16 if cuda else torch.float32,
                                max_position_embeddings=w["max_pos"])
        if cuda:
            model = model.to("cuda")  # a no-op when the device context already placed it there
    ds = dataset(w["n"], w["maxlen"], w["vocab"], fixed_len=w.get("fixed_len"))
    args = SFTConfig(output_dir=f"/tmp/e2e_{spec['arm']}", per_device_train_batch_size=w["batch"],
                     max_steps=spec["steps"] + (spec["profile_steps"] if spec.get("profile") else 0),
                     learning_rate=spec["lr"], logging_steps=1, report_to="none", bf16=cuda, use_cpu=not cuda,
                     save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     **{"max_length": w["maxlen"], **qlora_optim(spec), **spec["trl"]})
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=ds, processing_class=tok)
    if spec["lora"]:
        kwargs["peft_config"] = LoraConfig(r=LORA_R, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    mods = {"fused_ce": fused_ce, "smart_checkpointing": smart_checkpointing, "padding_free": padding_free,
            "packing": packing, "adamw_8bit": adamw_8bit, "fused_lora": fused_lora}
    ours = spec["ours"]
    options = {name: dict(opts) for name, opts in spec.get("options", {}).items()}
    if "padding_free" in ours:
        options.setdefault("padding_free", {})["attention"] = spec["attention"]
    # explicit modules: the GPU machine runs from a checkout, without our entry points
    stack = sft_plugins.compose(ours, options=options, plugins={n: mods[n] for n in ours})
    meter = make_meter(spec, tok.pad_token_id)
    kwargs["callbacks"] = [meter]
    kwargs = stack.prepare(**kwargs)
    result["stack_report"] = json.loads(json.dumps(stack.report, default=str))
    try:
        set_seed(0)
        trainer = SFTTrainer(**kwargs)
        meter.pad_id = trainer.processing_class.pad_token_id
        _train(trainer, meter, spec, flops_model(model.config, spec["lora"]), result)
        impl = model.config._attn_implementation or ""
        if impl.startswith("sft_packed_"):
            result["packed_backend"] = impl.removeprefix("sft_packed_")
            result["sdpa_fallback_calls"] = packed_attention.sdpa_calls(model)
            result["backend_errors"] = {k: v for k, v in packed_attention.KERNEL_PROBES.items() if v}
        with contextlib.suppress(Exception):
            result["smart_checkpointing_stats"] = smart_checkpointing.stats(model)
        with contextlib.suppress(Exception):
            result["optimizer_state"] = adamw_8bit.state_bytes(trainer.optimizer)
        rows = getattr(stack.state_of("packing"), "train_rows", None)
        if rows is not None:
            result["packing_stats"] = json.loads(json.dumps(rows.stats, default=str))
    finally:
        stack.undo()


def load_4bit(model_dir: str, cuda: bool) -> Any:
    """The saved model as a QLoRA user loads it: NF4 with double quantisation, bf16 compute (fp32 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if cuda else torch.float32
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=dtype,
                                                device_map={"": 0} if cuda else None, local_files_only=True)


def qlora_optim(spec: dict[str, Any]) -> dict[str, Any]:
    """The QLoRA recipe's optimizer (``optim="adamw_8bit"``) for arms that do not compose our adamw_8bit."""
    return {"optim": "adamw_8bit"} if spec["workload"].get("quant") and "adamw_8bit" not in spec.get("ours", ()) \
        else {}


def save_model(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """The same random-initialised model as the TRL arms (same preset, seed, device and dtype), for Unsloth."""
    import torch

    from sft_plugins.embedded import build_model

    w, out = spec["workload"], Path(spec["model_dir"])
    tok = tokenizer(w["vocab"])
    with torch.device("cuda") if spec["device"] == "cuda" else contextlib.nullcontext():
        model = build_model(w["preset"], tokenizer=tok, dtype=torch.bfloat16 if spec["device"] == "cuda" else
                            torch.float32, max_position_embeddings=w["max_pos"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    result["status"] = "ok"


def run_unsloth(spec: dict[str, Any], result: dict[str, Any]) -> None:
    import unsloth  # noqa: F401  (first: it patches transformers and TRL for the whole process)
    import torch
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    w = spec["workload"]
    _cap_memory(spec)
    model, tok = FastLanguageModel.from_pretrained(
        model_name=spec["model_dir"], max_seq_length=w["maxlen"], dtype=torch.bfloat16,
        load_in_4bit=bool(w.get("quant")), local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=LORA_R, lora_alpha=16, lora_dropout=0, bias="none", target_modules=LORA_TARGETS,
        use_gradient_checkpointing="unsloth", random_state=0)
    ds = dataset(w["n"], w["maxlen"], w["vocab"], fixed_len=w.get("fixed_len"))
    meter = make_meter(spec, tok.pad_token_id)
    args = SFTConfig(output_dir=f"/tmp/e2e_{spec['arm']}", per_device_train_batch_size=w["batch"],
                     max_steps=spec["steps"] + (spec["profile_steps"] if spec.get("profile") else 0),
                     learning_rate=spec["lr"], logging_steps=1, report_to="none", bf16=True, max_length=w["maxlen"],
                     save_strategy="no", dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     **{"optim": "adamw_torch", **qlora_optim(spec), **spec["trl"]})
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=ds, args=args, callbacks=[meter])
    meter.pad_id = getattr(trainer.processing_class, "pad_token_id", None) or tok.pad_token_id
    _train(trainer, meter, spec, flops_model(model.config, True), result)
    if result.get("status") == "ok" and not result.get("tokens_per_step"):
        result["note"] = "no tokens seen by the forward pre-hook: Unsloth bypassed the model's __call__"


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result: dict[str, Any] = {"arm": spec.get("arm"), "status": "running"}
    t0 = time.perf_counter()
    code = 0
    try:
        {"trl": run_trl, "unsloth": run_unsloth, "save_model": save_model}[spec["kind"]](spec, result)
    except BaseException as exc:  # the parent records it; the table says which arm failed and why
        if _oom(exc):
            result.update(status="OOM", error=f"{type(exc).__name__}: {exc}"[:600])
            with contextlib.suppress(Exception):
                _memory(result, spec["device"] == "cuda")
        else:
            result.update(status="error", error=f"{type(exc).__name__}: {exc}"[:1500])
            traceback.print_exc()
            code = 1
    result["child_s"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + json.dumps(result, default=str), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
