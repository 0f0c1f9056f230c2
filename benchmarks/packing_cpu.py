"""Benchmark: best-fit-decreasing packing of 1M examples on the CPU.

Lengths are lognormal (median ~330 tokens, sigma 0.8), clipped to [1, 2048]; rows hold 2048 tokens.
Times our vectorised BFD (``sft_plugins.plugins.packing.bfd.pack``) end to end (assignment + row layout),
best of ``--repeat`` runs, and reports fill and row count; optionally TRL's BFD
(``trl.data_utils.pack_dataset(..., "bfd")``) on the same lengths when ``--trl`` is given (it
builds an Arrow dataset of that many token lists first, which is not timed).

    python benchmarks/packing_cpu.py --trl --e2e 1000000 --out benchmarks/results/packing_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sft_plugins.plugins.packing.bfd import pack  # noqa: E402


def lengths_lognormal(n: int, median: float, sigma: float, cap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), 1, cap).astype(np.int64)


def time_trl(lengths: np.ndarray, cap: int) -> dict:
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    offsets = np.concatenate(([0], np.cumsum(lengths)))
    ids = np.zeros(int(offsets[-1]), dtype=np.int32)
    ds = Dataset.from_dict({"input_ids": [ids[offsets[i]:offsets[i + 1]] for i in range(lengths.size)]})
    t = time.perf_counter()
    packed = pack_dataset(ds, cap, "bfd")
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 3), "rows": len(packed), "fill": round(float(lengths.sum()) / (len(packed) * cap), 6)}


def time_e2e(lengths: np.ndarray, cap: int) -> dict:
    """The packing plugin's whole dataset transform on a tokenized ``datasets.Dataset`` (Arrow columns
    to flat arrays, over-long/no-loss accounting, BFD, rows); building the Dataset is not timed."""
    import pyarrow as pa
    from datasets import Dataset

    from sft_plugins.plugins.packing.rows import pack_dataset

    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
    values = pa.array(np.arange(int(offsets[-1]), dtype=np.int32) % 50000)
    ds = Dataset(pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), values)}))
    t = time.perf_counter()
    hf, store = pack_dataset(ds, None, None, {"max_length": cap})
    dt = time.perf_counter() - t
    return {"examples": int(lengths.size), "seconds": round(dt, 3), "rows": len(hf), "fill": store.stats["fill"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--median", type=float, default=330.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--capacity", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trl", action="store_true", help="also time TRL's BFD on the same lengths")
    ap.add_argument("--e2e", type=int, default=0, help="also time the plugin's whole transform on this many examples")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    lengths = lengths_lognormal(a.n, a.median, a.sigma, a.capacity, seed=0)
    runs, result = [], None
    for r in range(a.repeat):
        t = time.perf_counter()
        result = pack(lengths, a.capacity, seed=r)
        runs.append(time.perf_counter() - t)
    assert result is not None
    assert np.array_equal(np.sort(result.row_items), np.arange(a.n)), "an item was dropped or duplicated"
    loads = np.add.reduceat(lengths[result.row_items], result.row_ptr[:-1])
    assert loads.max() <= a.capacity
    out = {
        "command": "python " + " ".join(shlex.quote(x) for x in sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
        "workload": {"examples": a.n, "lengths": f"lognormal(median={a.median}, sigma={a.sigma}) clipped to "
                     f"[1, {a.capacity}]", "median": float(np.median(lengths)), "mean": round(float(lengths.mean()), 1),
                     "max": int(lengths.max()), "tokens": int(lengths.sum()), "capacity": a.capacity},
        "ours_bfd": {"seconds_best": round(min(runs), 3), "seconds_all": [round(x, 3) for x in runs],
                     "rows": result.n_rows, "fill": round(result.fill, 6), "dropped": 0, "target_seconds": 10.0},
    }
    if a.trl:
        out["trl_bfd"] = time_trl(lengths, a.capacity)
    if a.e2e:
        out["ours_plugin_transform"] = time_e2e(lengths[:a.e2e], a.capacity)
    print(json.dumps(out, indent=2))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
