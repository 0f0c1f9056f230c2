"""fused_ce: the training loss goes through ``sft_plugins.kernels``' fused linear + cross-entropy head.

How it takes over, without touching either trainer's code:

* ``sft_patch_model`` installs one forward on the *base* model instance (under any PEFT wrappers;
  PEFT's ``LoraModel.forward`` calls ``self.model.forward``, i.e. this instance attribute). In
  training mode it serves

  - ``model(..., labels=..., num_items_in_batch=...)`` (``transformers.Trainer``): backbone, then the
    kernel on the shifted hidden states with HF's ``ForCausalLMLoss`` normalisation (sum over valid
    tokens / ``num_items_in_batch``, or the mean); the logits are never built (``logits=None``);
  - ``model(..., fused_lm_head=True)`` (TRL ``SFTTrainer.compute_loss``): the same, returning TRL's
    ``FusedCausalLMOutput`` with ``log_probs`` (with grad), ``entropy``, ``is_top1`` and
    ``label_mask`` from the kernel's stats pass, so TRL's loss code, its ``entropy`` and its
    ``mean_token_accuracy`` metrics run unmodified on our numbers.

  Everything else (eval mode, generation, no labels, ``logits_to_keep``) goes to the forward that
  would have run without the plugin.
* ``SFTTrainer.__init__`` calls ``add_fused_lm_head`` (imported by name into
  ``trl.trainer.sft_trainer``), which would replace our forward with TRL's. While a model is
  patched, that name points to an interceptor: for *our* models it lets TRL install its head (so
  TRL's forward exists as the eval/generation delegate, exactly as in the baseline), then puts our
  forward back in front of it; other models go straight to TRL. A guard callback re-checks at
  ``on_train_begin`` (catching a trainer that installed TRL's head some other way) and refuses to
  train if something else replaced the forward.
* ``undo()`` leaves the model as the baseline would be at that point: TRL's head if TRL asked for
  one, otherwise the model's forward as before; the TRL module name is restored once no model is
  patched.

torch / transformers / trl / peft are imported inside functions only.
"""

from __future__ import annotations

import functools
import sys
import types
import weakref
from collections import Counter
from typing import Any, Callable

from .._errors import PluginError
from .._markers import hookimpl
from . import _lm_head
from ._fsdp import is_dtensor, is_fsdp_module

NAME = "fused_ce"
DEFAULT_OPTIONS: dict[str, Any] = {
    "backend": "auto",          # "auto" (Triton on CUDA / under TRITON_INTERPRET, else torch), "triton", "torch"
    "lm_head_lora": "train",    # a LoRA adapter on lm_head: "train" it through the kernel, or "refuse"
    "extra_model_types": [],    # model_types the user vouches for (plain lm_head + config scale/softcap)
}
_BACKENDS = ("auto", "triton", "torch")
_LORA_MODES = ("train", "refuse")
# What SFTTrainer asks TRL's head for; used when the guard has to reinstall TRL's head itself.
_SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
_MARK = "_sft_plugins_fused_ce"
_TRL_MODULE = "trl.trainer.sft_trainer"

# id(base model) -> its live patch (removed by undo). nn.Module hashes by identity anyway; the id
# plus a weakref check guards against a recycled id should a patched model die without undo.
_PATCHES: dict[int, _Patch] = {}
_TRL_ORIGINAL: Callable[..., None] | None = None  # TRL's add_fused_lm_head while we intercept it
_LAST_PATCH: weakref.ref[_Patch] | None = None  # the patch of the prepare() in progress (for its callback)


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    return {**DEFAULT_OPTIONS, **(options or {})}


def _option_errors(options: dict[str, Any] | None) -> list[str]:
    errors = []
    unknown = sorted(set(options or {}) - set(DEFAULT_OPTIONS))
    if unknown:
        errors.append(f"unknown option(s) {unknown}; fused_ce takes {sorted(DEFAULT_OPTIONS)}")
    opts = _options(options)
    if opts["backend"] not in _BACKENDS:
        errors.append(f"option 'backend' must be one of {_BACKENDS}, got {opts['backend']!r}")
    if opts["lm_head_lora"] not in _LORA_MODES:
        errors.append(f"option 'lm_head_lora' must be one of {_LORA_MODES}, got {opts['lm_head_lora']!r}")
    extra = opts["extra_model_types"]
    if isinstance(extra, str) or not all(isinstance(t, str) for t in extra):
        errors.append(f"option 'extra_model_types' must be a list of model_type strings, got {extra!r}")
    return errors


# -- the patch ------------------------------------------------------------------------------------
class _Patch:
    """Our forward on one base model, what it delegates to, and how to put things back."""

    def __init__(self, model: Any, options: dict[str, Any]):
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


def _make_forward(patch: _Patch, cls_forward: Callable[..., Any]) -> Callable[..., Any]:
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


def _kernel_inputs(model: Any, patch: _Patch, hidden: Any) -> tuple[Any, Any, Any]:
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


def _labels_forward(model: Any, patch: _Patch, args: tuple, kwargs: dict[str, Any], labels: Any,
                    shift_labels: Any, num_items_in_batch: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ..kernels import fused_linear_cross_entropy

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


def _trl_forward(model: Any, patch: _Patch, args: tuple, kwargs: dict[str, Any], labels: Any,
                 shift_labels: Any, num_items_in_batch: Any) -> Any:
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    from ..kernels import fused_linear_cross_entropy_stats

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
def _intercept(model: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for ``trl.trainer.sft_trainer.add_fused_lm_head`` while a model is patched."""
    original = _TRL_ORIGINAL
    assert original is not None
    patch = _PATCHES.get(id(model))
    if patch is None or patch.model_ref() is not model:
        return original(model, *args, **kwargs)
    patch.adopt_trl_head(original, args, kwargs)
    return None


setattr(_intercept, _MARK, True)


def _install_trl_interceptor() -> None:
    """Point SFTTrainer's ``add_fused_lm_head`` at the interceptor, if TRL is (or will be) in use.

    TRL is imported only when already imported or when ``args`` is TRL's; a trainer built after a
    later TRL import is caught by the guard callback instead."""
    global _TRL_ORIGINAL
    module = sys.modules.get(_TRL_MODULE)
    if module is None or _TRL_ORIGINAL is not None:
        return
    current = getattr(module, "add_fused_lm_head", None)
    if current is None or getattr(current, _MARK, False):
        return
    _TRL_ORIGINAL = current
    module.add_fused_lm_head = _intercept


def _remove_trl_interceptor() -> None:
    global _TRL_ORIGINAL
    if _PATCHES or _TRL_ORIGINAL is None:
        return
    module = sys.modules.get(_TRL_MODULE)
    if module is not None and getattr(module, "add_fused_lm_head", None) is _intercept:
        module.add_fused_lm_head = _TRL_ORIGINAL
    _TRL_ORIGINAL = None


def _ensure_taken_over(patch: _Patch, model: Any) -> None:
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


_GUARD_CLASS: type | None = None


def _guard_callback(patch: _Patch) -> Any:
    global _GUARD_CLASS
    if _GUARD_CLASS is None:
        from transformers import TrainerCallback

        class FusedCEGuard(TrainerCallback):
            """Checks at train begin that the loss path is ours (reinstalling over TRL's head if needed)."""

            def __init__(self, patch: _Patch) -> None:
                self.patch = patch

            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
                if model is not None:
                    _ensure_taken_over(self.patch, model)

        _GUARD_CLASS = FusedCEGuard
    return _GUARD_CLASS(patch)


def patch_of(model: Any) -> _Patch | None:
    """The live patch of ``model`` (or of its base under PEFT), for tests and debugging."""
    base = _lm_head.base_of(model)
    patch = _PATCHES.get(id(base))
    return patch if patch is not None and patch.model_ref() is base else None


def _zero3_enabled() -> bool:
    if "deepspeed" not in sys.modules:
        return False
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


# -- hooks ----------------------------------------------------------------------------------------
@hookimpl
def sft_describe(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": "training loss through a fused linear + cross-entropy kernel (no N x V logits), "
                   "in SFTTrainer (taking over TRL's fused head, keeping its metrics) and Trainer",
        "loss_parity": 1e-3,
    }


@hookimpl
def sft_check(names: list[str], args: Any, model: Any, options: dict[str, Any]) -> list[str]:
    errors = _option_errors(options)
    if errors:
        return errors
    opts = _options(options)
    if model is None or isinstance(model, str):
        return ["fused_ce patches the model: load it and pass model=<PreTrainedModel instance> to prepare()"]
    base = _lm_head.base_of(model)
    errors += _lm_head.model_errors(base, set(opts["extra_model_types"]))
    if not errors and opts["lm_head_lora"] == "refuse":
        try:
            _lm_head.resolve_head(base.get_output_embeddings(), lora="refuse")
        except _lm_head.UnsupportedHead as exc:
            errors.append(str(exc))
    if patch_of(base) is not None:
        errors.append("this model is already patched by another fused_ce stack: undo() that stack first")
    if args is not None:
        if getattr(args, "label_smoothing_factor", 0.0):
            errors.append("label_smoothing_factor > 0 makes the trainer compute the loss from the full logits "
                          "(its label smoother), bypassing fused_ce: set label_smoothing_factor=0 or drop fused_ce")
        if _zero3_enabled():
            errors.append("DeepSpeed ZeRO-3 partitions lm_head.weight, which the kernel reads directly (and "
                          "re-reads in backward): use ZeRO-2 or FSDP, or drop fused_ce")
        is_trl = type(args).__module__.startswith("trl.")
        liger_flce = (getattr(args, "liger_kernel_config", None) or {}).get("fused_linear_cross_entropy", True)
        if getattr(args, "use_liger_kernel", False) and not is_trl and liger_flce:
            errors.append("use_liger_kernel=True replaces the model's forward with Liger's fused CE at train "
                          "start: set liger_kernel_config={'fused_linear_cross_entropy': False} or drop one")
    return errors


@hookimpl
def sft_patch_model(model: Any, args: Any, options: dict[str, Any]) -> Callable[[], None]:
    opts = _options(options)
    base = _lm_head.base_of(model)
    if args is not None and type(args).__module__.startswith("trl."):
        import trl.trainer.sft_trainer  # noqa: F401  (SFTConfig given: SFTTrainer will follow)
    global _LAST_PATCH
    patch = _Patch(base, opts)
    _PATCHES[id(base)] = patch
    _LAST_PATCH = weakref.ref(patch)
    _install_trl_interceptor()
    patch.install()

    def undo() -> None:
        try:
            patch.undo()
        finally:
            if _PATCHES.get(id(base)) is patch:
                del _PATCHES[id(base)]
            _remove_trl_interceptor()

    return undo


@hookimpl
def sft_callbacks(args: Any, options: dict[str, Any]) -> list[Any]:
    # prepare() calls this right after sft_patch_model, so the last patch made is this stack's
    patch = _LAST_PATCH() if _LAST_PATCH is not None else None
    return [_guard_callback(patch)] if patch is not None and patch.active else []
