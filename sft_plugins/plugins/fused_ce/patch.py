"""The ``fused_ce`` patch: our forward on one base model instance, what it delegates to, how TRL's
``add_fused_lm_head`` is intercepted while a model is patched, and how everything is put back.

The patch of a model is found from the model itself (an instance attribute, removed by undo), and the
interceptor keeps TRL's original and its own user count on itself: no module-level run state, so two
stacks in one process patch two models independently.
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections import Counter
from typing import Any, Callable

from ..._errors import PluginError
from ..shared import is_dtensor, is_fsdp_module
from . import lm_head as _lm_head

_MARK = "_sft_plugins_fused_ce"
_PATCH_ATTR = "_sft_plugins_fused_ce_patch"  # on the base model instance while it is patched
_TRL_MODULE = "trl.trainer.sft_trainer"
# What SFTTrainer asks TRL's head for; used when the guard has to reinstall TRL's head itself.
_SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")


# -- the patch ------------------------------------------------------------------------------------
class Patch:
    """Our forward on one base model, what it delegates to, and how to put things back."""

    def __init__(self, model: Any, options: dict[str, Any]):
        # options as validated by the plugin's schema
        self.model_ref = weakref.ref(model)
        self.backend: str | None = None if options["backend"] == "auto" else options["backend"]
        self.lora_mode: str = options["lm_head_lora"]
        self.transform = _lm_head.logit_transform(model)
        # The instance attribute `forward` before us (absent for a fresh model), restored by undo
        self.had_own_forward = "forward" in vars(model)
        self.saved_forward = vars(model).get("forward")
        self.delegate: Callable[..., Any] = model.forward  # baseline forward for everything not taken over
        self.trl_forward: Callable[..., Any] | None = None  # TRL's head, once TRL installed one
        self.calls: Counter[str] = Counter()  # which paths ran through the kernel (tests, debugging)
        self.active = True  # False once undone: the guard callback then stays silent
        self.installed = types.MethodType(_make_forward(self, type(model).forward), model)

    # forward attribute bookkeeping
    def install(self) -> None:
        model = self.model_ref()
        if model is not None:
            model.forward = self.installed

    def is_installed(self) -> bool:
        """Our forward is what the model calls: directly, or under wrappers that keep a
        ``__wrapped__`` chain (accelerate's autocast / fp32-output wrappers under mixed precision)."""
        model = self.model_ref()
        return model is not None and _wraps(vars(model).get("forward"), self.installed.__func__)

    def _restore_pre_patch(self, model: Any) -> None:
        if self.had_own_forward:
            model.forward = self.saved_forward
        else:
            vars(model).pop("forward", None)

    def adopt_trl_head(self, trl_add: Callable[..., None], args: tuple, kwargs: dict[str, Any]) -> None:
        """Let TRL install its head on the bare model, keep it as the delegate, put ours in front."""
        model = self.model_ref()
        temperature = kwargs.get("temperature", args[0] if args else 1.0)
        cast_fp32 = kwargs.get("cast_lm_head_to_fp32", args[1] if len(args) > 1 else False)
        if temperature != 1.0 or cast_fp32:
            raise PluginError(f"fused_ce: TRL asked for a fused head with temperature={temperature}, "
                              f"cast_lm_head_to_fp32={cast_fp32}; fused_ce implements the SFT head only "
                              "(temperature 1, model dtype): drop fused_ce for this trainer")
        # PEFT may have wrapped lm_head since prepare() (SFTTrainer(peft_config=...)): check it now,
        # at construction, rather than at the first step
        _check_head(model, self.lora_mode)
        self._restore_pre_patch(model)
        trl_add(model, *args, **kwargs)
        self.trl_forward = self.delegate = vars(model)["forward"]
        self.install()

    def undo(self) -> None:
        self.active = False
        model = self.model_ref()
        if model is None:
            return
        current = vars(model).get("forward")
        if current is not self.installed:
            if _wraps(current, self.installed.__func__):
                # Wrapped by accelerate (mixed precision) after prepare(): removing our layer would drop
                # theirs too. Now inactive, ours passes every call to the baseline forward unchanged.
                return
            raise PluginError("fused_ce: the model's forward was replaced after fused_ce patched it "
                              f"(now {current!r}); undo cannot restore it safely")
        if self.trl_forward is not None:
            model.forward = self.trl_forward  # what SFTTrainer installed in the baseline
        else:
            self._restore_pre_patch(model)


def _wraps(fn: Any, target: Callable[..., Any]) -> bool:
    """Whether ``fn`` is ``target``, or reaches it through bound methods and ``__wrapped__`` links."""
    for _ in range(32):  # wrapper chains are short; bounded against cycles
        if fn is None:
            return False
        fn = getattr(fn, "__func__", fn)
        if fn is target:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _check_head(model: Any, lora_mode: str) -> None:
    try:
        _lm_head.resolve_head(model.get_output_embeddings(), lora=lora_mode)
    except _lm_head.UnsupportedHead as exc:
        raise PluginError(f"fused_ce: {exc}") from None


def _make_forward(patch: Patch, cls_forward: Callable[..., Any]) -> Callable[..., Any]:
    # functools.wraps keeps the class forward's signature: Trainer reads it to decide whether the model
    # takes num_items_in_batch, generate() validates kwargs against it, TRL derives its columns from it
    @functools.wraps(cls_forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        has_labels = labels is not None or shift_labels is not None
        active = patch.active
        keep = kwargs.get("logits_to_keep", 0)
        # Only the plain loss call is taken over: positional args beyond input_ids would not line up
        # with the backbone's signature, and logits_to_keep / return_dict=False ask for logits
        plain = (len(args) <= 1 and isinstance(keep, int) and keep == 0
                 and kwargs.get("return_dict", True) is not False)
        if active and fused_lm_head and (self.training or patch.trl_forward is None):
            # TRL's compute_loss (train mode); in eval mode TRL's own head keeps serving, as in the baseline
            if not has_labels:
                raise ValueError("fused_lm_head=True needs labels")
            patch.calls["fused_lm_head"] += 1
            return _trl_forward(self, patch, args, kwargs, labels, shift_labels, num_items_in_batch)
        # HF computes a loss only when `labels` is given (then `shift_labels`, if any, wins)
        if active and not fused_lm_head and self.training and labels is not None and plain:
            patch.calls["labels"] += 1
            return _labels_forward(self, patch, args, kwargs, labels, shift_labels, num_items_in_batch)
        if fused_lm_head:
            kwargs["fused_lm_head"] = True
        if labels is not None:
            kwargs["labels"] = labels
        if shift_labels is not None:
            kwargs["shift_labels"] = shift_labels
        if num_items_in_batch is not None:
            kwargs["num_items_in_batch"] = num_items_in_batch
        return patch.delegate(*args, **kwargs)

    setattr(forward, _MARK, True)
    return forward


def _hidden_and_labels(model: Any, args: tuple, kwargs: dict[str, Any], labels: Any,
                       shift_labels: Any) -> tuple[Any, Any, Any]:
    """Backbone outputs, hidden states and labels aligned position by position (HF's shift)."""
    kwargs["use_cache"] = False  # training: no KV cache (TRL's head and TRL's compute_loss do the same)
    out = model.base_model(*args, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if shift_labels is None:
        # ForCausalLMLoss pads labels with -100 and shifts: the last position predicts nothing,
        # so dropping it is the same loss without a padded copy
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    return out, hidden, labels


def _kernel_inputs(model: Any, patch: Patch, hidden: Any) -> tuple[Any, Any, Any]:
    # Resolved per call: PEFT / FSDP may replace the head after prepare(); cheap type checks only
    head = model.get_output_embeddings()
    _unshard_fsdp_head(head)
    try:
        project = _lm_head.resolve_head(head, lora=patch.lora_mode)
    except _lm_head.UnsupportedHead as exc:
        raise PluginError(f"fused_ce: {exc}") from None
    h, w, b = project(hidden)
    if is_dtensor(w):
        if any(is_fsdp_module(m) for m in model.modules()):
            raise PluginError("fused_ce: under FSDP the lm_head weight is still sharded when the kernel reads it "
                              "and no FSDP unit on the lm_head can unshard it: shard the lm_head as its own unit "
                              "or with the model's root (accelerate's FSDP2 default), or drop fused_ce")
        # A DTensor that no FSDP unit manages (tensor parallel): gather it, as TRL's head does
        w = w.full_tensor()
        b = b.full_tensor() if b is not None else None
    return h.to(w.device), w, b  # device_map: the backbone may end on another device than the head


def _unshard_fsdp_head(head: Any) -> None:
    """FSDP2: make sure the head's parameters are unsharded before the kernel reads them.

    Normally FSDP has done it already: accelerate puts ``[norm, lm_head]`` in one unit (or the head stays
    in the root's) whose pre-forward hook runs inside the backbone, so the weight is the unsharded
    parameter here. A head that is an FSDP unit of its own is never unsharded, because the kernel
    bypasses ``lm_head.forward``: unshard it through FSDP (``FSDPModule.unshard()``, which follows the
    mixed-precision policy). The gradient then lands on the unsharded parameter and FSDP's final
    post-backward reduce-scatters (averages) it into the shards like any unit's, and reshards.
    ``full_tensor()`` instead would leave each rank's shard with only its own rank's gradient."""
    for module in head.modules():
        if is_fsdp_module(module) and any(is_dtensor(p) for p in module.parameters()):
            module.unshard()


def _labels_forward(model: Any, patch: Patch, args: tuple, kwargs: dict[str, Any], labels: Any,
                    shift_labels: Any, num_items_in_batch: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ...kernels import fused_linear_cross_entropy

    out, hidden, labels = _hidden_and_labels(model, args, kwargs, labels, shift_labels)
    h, w, b = _kernel_inputs(model, patch, hidden)
    t = patch.transform
    # reduction "mean" with num_items_in_batch is HF's sum / num_items_in_batch; without it, the
    # mean over valid tokens (0, not NaN, when every label is ignored)
    loss = fused_linear_cross_entropy(
        h.reshape(-1, h.shape[-1]), w, labels.reshape(-1).to(h.device), bias=b, reduction="mean",
        softcap=t.softcap, logit_scale=t.scale, num_items_in_batch=num_items_in_batch, _backend=patch.backend)
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))


def _trl_forward(model: Any, patch: Patch, args: tuple, kwargs: dict[str, Any], labels: Any,
                 shift_labels: Any, num_items_in_batch: Any) -> Any:
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    from ...kernels import fused_linear_cross_entropy_stats

    _, hidden, labels = _hidden_and_labels(model, args, kwargs, labels, shift_labels)
    h, w, b = _kernel_inputs(model, patch, hidden)
    labels = labels.to(h.device)
    mask = labels != -100
    t = patch.transform
    stats = fused_linear_cross_entropy_stats(
        h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), bias=b, reduction="none",
        softcap=t.softcap, logit_scale=t.scale, _backend=patch.backend)
    # The kernel's per-token loss is 0 at ignored positions, like TRL's log_probs; -0 sums to 0
    log_probs = -stats.loss.view(mask.shape)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / torch.as_tensor(denom, device=log_probs.device)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=stats.entropy.view(mask.shape),
                               is_top1=stats.is_top1.view(mask.shape), label_mask=mask)


# -- intercepting TRL's add_fused_lm_head ---------------------------------------------------------
class TrlHeadInterceptor:
    """Stands in for ``trl.trainer.sft_trainer.add_fused_lm_head`` while any model is patched: for a
    patched model it lets TRL install its head and puts ours back in front; others go straight to TRL.
    It holds TRL's original and how many patches use it (the module attribute is process-global)."""

    def __init__(self, original: Callable[..., None]) -> None:
        self.original = original
        self.users = 0
        setattr(self, _MARK, True)

    def __call__(self, model: Any, *args: Any, **kwargs: Any) -> None:
        patch = patch_of_base(model)
        if patch is None:
            return self.original(model, *args, **kwargs)
        patch.adopt_trl_head(self.original, args, kwargs)
        return None


def install_trl_interceptor() -> TrlHeadInterceptor | None:
    """Point SFTTrainer's ``add_fused_lm_head`` at the interceptor (one per process, shared by the
    patches), if TRL is in use; returns it, counted as used, or None when TRL is not imported (a trainer
    built after a later TRL import is caught by the guard callback instead)."""
    module = sys.modules.get(_TRL_MODULE)
    current = getattr(module, "add_fused_lm_head", None) if module is not None else None
    if current is None:
        return None
    if not isinstance(current, TrlHeadInterceptor):
        current = TrlHeadInterceptor(current)
        module.add_fused_lm_head = current
    current.users += 1
    return current


def release_trl_interceptor(interceptor: TrlHeadInterceptor) -> None:
    """One patch less; the last one gives TRL its function back."""
    interceptor.users -= 1
    module = sys.modules.get(_TRL_MODULE)
    if interceptor.users <= 0 and module is not None and getattr(module, "add_fused_lm_head", None) is interceptor:
        module.add_fused_lm_head = interceptor.original


def patch_of_base(base: Any) -> Patch | None:
    """The live patch of a base model instance, or None."""
    patch = vars(base).get(_PATCH_ATTR) if hasattr(base, "__dict__") else None
    return patch if patch is not None and patch.active else None


def apply_patch(base: Any, options: dict[str, Any]) -> tuple[Patch, Callable[[], None]]:
    """Install our forward on ``base``; returns the patch and its undo."""
    patch = Patch(base, options)
    vars(base)[_PATCH_ATTR] = patch
    interceptor = install_trl_interceptor()
    patch.install()

    def undo() -> None:
        try:
            patch.undo()
        finally:
            if vars(base).get(_PATCH_ATTR) is patch:
                del vars(base)[_PATCH_ATTR]
            if interceptor is not None:
                release_trl_interceptor(interceptor)

    return patch, undo


def ensure_taken_over(patch: Patch, model: Any) -> None:
    """Called when training begins: our forward must be the one the trainer will call."""
    if not patch.active:
        return  # the stack was undone: the trainer now trains as the baseline would
    base = _lm_head.base_of(model)
    if patch.model_ref() is not base:
        raise PluginError("fused_ce: the trainer trains a model that fused_ce did not patch; pass the same "
                          "model instance to stack.prepare() and to the trainer")
    if patch.is_installed():
        return
    current = vars(base).get("forward")
    if is_trl_head(current):
        # TRL's head was installed without going through the interceptor (trl imported after
        # prepare()): it wraps our forward, so rebuild it on the bare model, then take over
        from trl.trainer.utils import add_fused_lm_head

        patch.adopt_trl_head(add_fused_lm_head, (), {"outputs": _SFT_OUTPUTS})
        return
    raise PluginError(f"fused_ce: the model's forward was replaced after fused_ce patched it (now {current!r}); "
                      "the loss would not go through the kernel. Compose the other patch before fused_ce "
                      "or drop one of them")


def is_trl_head(fn: Any) -> bool:
    """Whether ``fn`` is the forward TRL's ``add_fused_lm_head`` installs. It copies the class
    forward's name with functools.wraps, so look at the code object instead."""
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


