"""The end-to-end benchmark's summary arithmetic (profile, device busy time, warm-up, an arm's expected time), on stand-in records (the GPU run is where it is used)."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _e2e_profile  # noqa: E402
import end_to_end  # noqa: E402


def _event(start_us: float, end_us: float, device: str = "DeviceType.CUDA", annotation: bool = False):
    return SimpleNamespace(time_range=SimpleNamespace(start=start_us, end=end_us), device_type=device,
                           is_user_annotation=annotation)


def test_device_busy_counts_overlapping_streams_once_and_skips_ranges_and_host_events():
    ms = 1000.0  # the events' times are in microseconds
    events = [_event(0, 100 * ms), _event(50 * ms, 150 * ms), _event(120 * ms, 140 * ms),  # a copy beside kernels
              _event(300 * ms, 400 * ms),
              _event(0, 1000 * ms, annotation=True),  # a range's device-side span
              _event(0, 1000 * ms, device="DeviceType.CPU")]  # a host op
    out = _e2e_profile.device_busy(SimpleNamespace(events=lambda: events), [0.5, 0.5], 0.2)
    # busy: [0, 150] and [300, 400] ms = 250 ms over two profiled steps of 500 ms; unprofiled, a step takes 200 ms
    assert out == {"profiled_step_wall_ms": 500.0, "step_ms": 200.0, "device_busy_ms": 125.0, "host_gap_ms": 75.0}


def test_device_busy_without_timed_steps_reports_nothing():
    assert _e2e_profile.device_busy(SimpleNamespace(events=lambda: [_event(0, 10)]), []) == {}


def test_attribution_tells_adapter_gemms_from_base_gemms_and_names_plugin_regions():
    """A CPU profile of a LoRA-shaped projection (rank 4), a cast, a scale-and-add, a GEMM in the CE head's
    range and one in a recompute: each lands in its kind, and the recompute's part is reported apart."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    x, w, a, b = torch.randn(64, 32), torch.randn(48, 32), torch.randn(4, 32), torch.randn(48, 4)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y = x @ w.t()  # base
        y = y + (x.double().float() @ a.t() @ b.t()) * 2.0  # adapter GEMMs, a cast, a scale and an add
        with record_function("sft_plugins.fused_ce"):
            x @ w.t()
        with record_function("sft_plugins.recompute"):
            x @ w.t()
    ranges, kinds, recompute = _e2e_profile.attribute(prof, cuda=False, lora_rank=4)
    expected = {"base GEMMs", "LoRA adapter GEMMs", "casts and copies", "elementwise and other ops", "CE head"}
    assert expected <= set(kinds)
    assert "base GEMMs" in recompute and "LoRA adapter GEMMs" not in recompute and "CE head" not in recompute
    assert {"other", "sft_plugins.fused_ce", "sft_plugins.recompute"} == set(ranges)
    assert _e2e_profile.kind_of("aten::mm", [], [[64, 32], [32, 48]], 4) == "base GEMMs"
    assert _e2e_profile.kind_of("aten::mm", ["sft_plugins.layer_backward"], [[48, 64], [64, 4]], 4) == \
        "LoRA adapter GEMMs"
    assert _e2e_profile.kind_of("aten::_flash_attention_forward", [], [], 4) == "attention"
    assert _e2e_profile.kind_of("aten::copy_", ["sft_plugins.offload"], [], 4) == "offload copies"
    assert _e2e_profile.kind_of("sft_plugins.lean_mlp", ["sft_plugins.recompute"], [], 4) == "plugin kernels (Triton)"
    assert _e2e_profile.kind_of("aten::mul", ["Optimizer.step#AdamW.step"], [], 4) == "optimizer"


def test_a_plugin_functions_nodes_are_counted_as_plugin_kernels():
    """Kernels a plugin's autograd Function launches without an aten op (Triton's launcher) belong to the
    Function's apply or backward node: those are the plugins' kernels, another Function's are not."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    def function_class(name: str, module: str) -> type:
        def backward(ctx, g):
            time.sleep(0.002)  # host time of the node itself, as a directly launched kernel's device time is
            return g

        cls = type(name, (torch.autograd.Function,), {"forward": staticmethod(lambda ctx, x: x.clone()),
                                                       "backward": staticmethod(backward)})
        cls.__module__ = module
        return cls

    ours, theirs = function_class("_StubPluginOp", "sft_plugins.stub"), function_class("_StubOtherOp", "elsewhere")
    assert {"_StubPluginOp", "_StubPluginOpBackward"} <= _e2e_profile.plugin_function_nodes()
    assert not {"_StubOtherOp", "_StubOtherOpBackward"} & _e2e_profile.plugin_function_nodes()
    x = torch.randn(8, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours.apply(x).sum().backward()
    _, kinds, _ = _e2e_profile.attribute(prof, cuda=False, lora_rank=None)
    assert kinds.get("plugin kernels (Triton)", 0.0) >= 1.5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        theirs.apply(x).sum().backward()
    _, kinds, _ = _e2e_profile.attribute(prof, cuda=False, lora_rank=None)
    assert kinds.get("plugin kernels (Triton)", 0.0) < 1.5 and kinds.get("elementwise and other ops", 0.0) >= 1.5
    assert _e2e_profile.kind_of(_e2e_profile._NODE_PREFIX + "_StubPluginOpBackward", [], [], None,
                                frozenset({"_StubPluginOpBackward"})) == "plugin kernels (Triton)"


def test_an_arm_still_warming_up_is_named_beside_the_target():
    """The end-to-end summary compares the halves of each arm's timed steps: an arm whose second half ran more
    than 10% faster was still warming up, and the target line says so."""
    import end_to_end

    def arm(times, peer=False):
        steps = [{"step": i + 1, "time_s": t, "real_tokens": 1000} for i, t in enumerate(times)]
        return {"status": "ok", "peer": peer, "workload": "short", "lora": True, "per_step": steps,
                "timed_steps": len(times) - 2, "tokens_per_s": 1000 / (sum(times[2:]) / (len(times) - 2)),
                "s_per_step": sum(times[2:]) / (len(times) - 2), "tokens_per_step": 1000, "mfu": 0.1, "peak_GiB": 1.0}

    out = {"arms": {"ours_all": arm([5, 1, 1, 1, 1, 1, 1, 1]),
                    "unsloth_packing": arm([9, 3, 2, 2, 2, 1.5, 1.5, 1.5], peer=True)}}
    end_to_end.summarise(out)
    assert out["arms"]["ours_all"]["second_half_speedup"] == 1.0
    assert out["arms"]["unsloth_packing"]["second_half_speedup"] == round(2 / 1.5, 3)  # 2 s a step, then 1.5
    assert out["summary"]["target"]["warming_up"] == {"unsloth_packing": 1.333}
    assert "unsloth_packing ran 1.333x faster over the second half" in end_to_end.table(out)
    assert end_to_end.second_half_speedup({"timed_steps": 3, "per_step": out["arms"]["ours_all"]["per_step"]}) is None


def test_idle_time_is_charged_to_the_host_scope_that_ended_it_and_the_op_that_began_it():
    """Device gaps (all streams together): one ended inside the CE head's range, two inside the optimizer step,
    one that began while the host sat in a sync (``aten::item``); short gaps and range spans do not count."""

    def host(name, start, end, parent=None):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type="DeviceType.CPU",
                               is_user_annotation=False, cpu_parent=parent)

    step = host("ProfilerStep#1", 0, 2000)
    ce = host("sft_plugins.fused_ce", 80, 320, step)
    item = host("aten::item", 480, 690, step)
    opt = host("Optimizer.step#AdamW.step", 695, 1000, step)
    events = [step, ce, host("aten::mm", 140, 160, ce), item, opt, host("aten::add_", 760, 790, opt),
              _event(0, 100), _event(150, 300), _event(302, 500),  # a 2 us gap: not counted
              _event(700, 720), _event(780, 1000), _event(0, 2000, annotation=True)]
    out = _e2e_profile.idle_attribution(SimpleNamespace(events=lambda: events), n_steps=2)
    # gaps: 100-150 (ends in the CE range), 500-700 (begins in aten::item, ends in the optimizer), 720-780
    assert out["idle_gaps_per_step"] == 1.5
    assert out["idle_ms_by_scope"] == {"Optimizer.step#AdamW.step": 0.13, "sft_plugins.fused_ce": 0.03}
    assert out["idle_ms_by_op_at_start"] == {"aten::item": 0.1, "Optimizer.step#AdamW.step": 0.03,
                                             "sft_plugins.fused_ce": 0.03}
    assert _e2e_profile.idle_attribution(SimpleNamespace(events=lambda: [_event(0, 10)]), 1) == {}


def test_an_arm_is_expected_to_take_as_long_as_finished_arms_of_its_kind():
    done = [{"kind": "unsloth", "status": "ok", "wall_s": 120.6}, {"kind": "trl", "status": "ok", "wall_s": 40.3},
            {"kind": "trl", "status": "ok", "wall_s": 44.0}, {"kind": "trl", "status": "skipped"}]
    # the H100 run where one Unsloth arm's 121 s made the median arm look too long for ours to start
    assert end_to_end.expected_wall_s(done, "trl") == 44.0
    assert end_to_end.expected_wall_s(done, "unsloth") == 120.6
    assert end_to_end.expected_wall_s(done[:1], "trl") == 40.0  # none of its kind finished yet: the default
