"""Model-architecture specifics of the ``fused_ce`` plugin: which models it knows, how their logits
are formed from the last hidden state, and how a (possibly PEFT-wrapped) LM head reduces to one
``hidden' @ weight'.T + bias`` product that the fused kernel can take.

Imports torch only inside functions: ``sft_plugins.available()`` must stay cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..shared import dequantized_weight, quantization_of, unsharded_class

# model_type -> the CausalLM forward computes ``logits = lm_head(hidden)`` followed only by the
# transforms read from the config (scale, softcap) and ``loss_function``. Checked against the
# ``*ForCausalLM.forward`` sources of transformers 5.17-5.24; anything else is refused unless the
# user vouches for it (option ``extra_model_types``), because a model whose forward does more to
# the logits (extra heads, per-token scales) would be trained on a different loss silently.
KNOWN_MODEL_TYPES: frozenset[str] = frozenset({
    "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2",
    "granite", "cohere", "cohere2", "smollm3", "starcoder2", "glm4",
})


class UnsupportedHead(Exception):
    """The LM head cannot be reduced to one fused product; the message names why and the fix."""


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap * tanh((h @ W.T + b) * scale / softcap)`` (no tanh when softcap is None)."""

    scale: float
    softcap: float | None


def text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(model: Any) -> LogitTransform:
    """The logit scale and softcap the model's forward applies, read the way TRL 1.16 reads them
    (``add_fused_lm_head``), so TRL's head and ours score the same distribution."""
    cfg = text_config(model)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)  # Falcon-H1 multiplies
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        # Granite / MiniCPM3 divide by logits_scaling; HyperCLOVA X multiplies by it
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1.0 / cfg.logits_scaling
    return LogitTransform(scale=1.0 if scale is None else float(scale),
                          softcap=float(softcap) if softcap else None)


def base_of(model: Any) -> Any:
    """The transformers model under any PEFT wrappers (the object TRL patches and PEFT wraps)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft."):
        return get_base()
    return model


def model_errors(model: Any, extra_model_types: set[str]) -> list[str]:
    """Why ``model`` (the base transformers model) cannot use the fused head, or []."""
    import torch

    name = type(model).__name__
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        return [f"model must be a transformers PreTrainedModel instance, got {name}: load it yourself "
                "and pass model=<instance> to prepare()"]
    cfg = text_config(model)
    # The top-level type: a multimodal wrapper (e.g. "gemma3") has a text config of a known type
    # but its own forward, which was not checked
    mtype = getattr(model.config, "model_type", None)
    errors = []
    if mtype not in KNOWN_MODEL_TYPES | extra_model_types:
        errors.append(f"model_type {mtype!r} ({name}) is not one whose logits fused_ce knows how to form "
                      f"(known: {sorted(KNOWN_MODEL_TYPES)}); if its *ForCausalLM.forward is "
                      "`logits = lm_head(hidden)` plus only config logit scale/softcap, pass "
                      f"options={{'fused_ce': {{'extra_model_types': [{mtype!r}]}}}}")
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        errors.append(f"{name} has no separate backbone (base_model_prefix); fused_ce needs a *ForCausalLM model")
    if getattr(cfg, "output_router_logits", False):
        errors.append("config.output_router_logits=True adds an MoE load-balancing loss that fused_ce does not "
                      "compute: set it to False or drop fused_ce")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        errors.append(f"{name} has no output embeddings (lm_head)")
    else:
        try:
            resolve_head(head, lora="train")
        except UnsupportedHead as exc:
            errors.append(str(exc))
    if "_loss_function" in vars(model):
        errors.append("model.loss_function was replaced by a custom loss; fused_ce would bypass it: "
                      "drop fused_ce or the custom loss_function")
    return errors


# A head reduced to a product: ``project(hidden) -> (hidden', weight', bias)``.
Projector = Callable[[Any], tuple[Any, Any, Any]]


def resolve_head(head: Any, *, lora: str) -> Projector:
    """Reduce the LM head module to a projector, or raise :class:`UnsupportedHead`.

    * ``nn.Linear``: ``(h, W, b)``.
    * PEFT ``ModulesToSaveWrapper``: the active adapter's trained copy (the original when adapters are
      disabled), exactly the module PEFT's forward would call.
    * PEFT ``lora.Linear`` (plain LoRA, unmerged): ``h @ W.T + sum_a s_a * B_a(A_a(drop_a(h)))`` equals
      ``[h, s_1 A_1 drop_1(h), ...] @ [W | B_1 | ...].T``, so the kernel sees one product of width
      ``H + sum r`` and autograd carries the gradients into A, B (and W if trainable). With
      ``lora="refuse"`` an active LoRA head is refused instead.
    """
    import torch

    kind = unsharded_class(type(head))
    module = kind.__module__
    if module.startswith("peft.") and kind.__name__ == "ModulesToSaveWrapper":
        active = list(getattr(head, "active_adapters", []) or [])
        if head.disable_adapters or not active:
            return resolve_head(head.original_module, lora=lora)
        if any(a not in head.modules_to_save for a in active):
            return resolve_head(head.original_module, lora=lora)  # PEFT's own passthrough rule
        return resolve_head(head.modules_to_save[active[0]], lora=lora)
    if module.startswith("peft.tuners.lora") and kind.__name__ == "Linear":
        return _resolve_lora(head, lora=lora)
    if module.startswith("peft."):
        raise UnsupportedHead(f"the lm_head is wrapped by PEFT's {kind.__name__}, which fused_ce cannot fuse "
                              "(it would be silently untrained): keep the lm_head out of the PEFT config "
                              "(target_modules / trainable_token_indices) or drop fused_ce")
    if quantization_of(head) == "4bit" and not head.weight.requires_grad:
        # A frozen bitsandbytes 4-bit head (transformers keeps the head unquantised unless told otherwise):
        # the dense weight its own matmul_4bit would multiply by, dequantised per call by bitsandbytes
        def project_4bit(h: Any) -> tuple[Any, Any, Any]:
            return h, dequantized_weight(head, getattr(head, "compute_dtype", None) or h.dtype), head.bias

        return project_4bit
    if kind is not torch.nn.Linear:
        raise UnsupportedHead(f"the lm_head is a {kind.__module__}.{kind.__name__}, not a plain nn.Linear or a "
                              "frozen bitsandbytes 4-bit Linear4bit (8-bit LLM.int8() and custom heads are not "
                              "fused): keep the lm_head unquantised (transformers' default; "
                              "BitsAndBytesConfig(llm_int8_skip_modules=['lm_head'])) or drop fused_ce")

    def project(h: Any) -> tuple[Any, Any, Any]:
        return h, head.weight, head.bias

    return project


def _resolve_lora(layer: Any, *, lora: str) -> Projector:
    import torch

    base = layer.get_base_layer()
    base_project = resolve_head(base, lora=lora)
    if layer.disable_adapters or layer.merged:
        return base_project  # PEFT's forward then calls only the base layer (merged weights included)
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return base_project
    if lora == "refuse":
        raise UnsupportedHead("the lm_head carries an active LoRA adapter and option lm_head_lora='refuse' is "
                              "set: remove 'lm_head' from target_modules, or set lm_head_lora='train'")
    for a in active:
        if a in getattr(layer, "lora_variant", {}):
            variant = type(layer.lora_variant[a]).__name__
            raise UnsupportedHead(f"the lm_head LoRA adapter {a!r} uses a LoRA variant ({variant}, e.g. DoRA) "
                                  "that fused_ce cannot fuse: use plain LoRA on the lm_head, leave it out of "
                                  "target_modules, or drop fused_ce")
        if getattr(layer, "lora_bias", {}).get(a, False):
            raise UnsupportedHead(f"the lm_head LoRA adapter {a!r} has lora_bias=True, which fused_ce does not "
                                  "fuse: set lora_bias=False or leave lm_head out of target_modules")
        if not isinstance(layer.lora_A[a], torch.nn.Linear) or not isinstance(layer.lora_B[a], torch.nn.Linear):
            raise UnsupportedHead(f"the lm_head LoRA adapter {a!r} is not a pair of nn.Linear layers")
    if getattr(layer, "fan_in_fan_out", False):
        raise UnsupportedHead("the lm_head LoRA layer has fan_in_fan_out=True, which fused_ce does not fuse")

    def project(h: Any) -> tuple[Any, Any, Any]:
        h0, w0, b0 = base_project(h)
        hs, ws = [h0], [w0]
        for a in active:
            lora_a, lora_b = layer.lora_A[a], layer.lora_B[a]
            # Same op order and dropout call as PEFT's Linear.forward: the RNG stream stays identical
            x = h.to(lora_a.weight.dtype)
            low = lora_a(layer.lora_dropout[a](x)) * layer.scaling[a]
            hs.append(low.to(h0.dtype))
            ws.append(lora_b.weight.to(w0.dtype))
        return torch.cat(hs, dim=-1), torch.cat(ws, dim=1), b0

    return project
