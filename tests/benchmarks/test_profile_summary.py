"""The end-to-end benchmark's profile arithmetic, on stand-in profiler events (the GPU run is where it is used)."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import _e2e_arms  # noqa: E402


def _event(start_us: float, end_us: float, device: str = "DeviceType.CUDA", annotation: bool = False):
    return SimpleNamespace(time_range=SimpleNamespace(start=start_us, end=end_us), device_type=device,
                           is_user_annotation=annotation)


def test_device_busy_counts_overlapping_streams_once_and_skips_ranges_and_host_events():
    ms = 1000.0  # the events' times are in microseconds
    events = [_event(0, 100 * ms), _event(50 * ms, 150 * ms), _event(120 * ms, 140 * ms),  # a copy beside kernels
              _event(300 * ms, 400 * ms),
              _event(0, 1000 * ms, annotation=True),  # a range's device-side span
              _event(0, 1000 * ms, device="DeviceType.CPU")]  # a host op
    out = _e2e_arms.device_busy(SimpleNamespace(events=lambda: events), [0.5, 0.5])
    # busy: [0, 150] and [300, 400] ms = 250 ms over two steps of 500 ms each
    assert out == {"step_wall_ms": 500.0, "device_busy_ms": 125.0, "host_gap_ms": 375.0}


def test_device_busy_without_timed_steps_reports_nothing():
    assert _e2e_arms.device_busy(SimpleNamespace(events=lambda: [_event(0, 10)]), []) == {}
