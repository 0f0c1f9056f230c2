"""The generated token dataset's knobs: the id range and fixed lengths (the GPU benchmarks use both)."""

from sft_plugins.embedded import build_token_dataset


def test_token_dataset_ids_and_lengths():
    ids = build_token_dataset(64, 512, 600, seed=1)["input_ids"]
    assert all(24 <= len(x) <= 512 for x in ids) and len({len(x) for x in ids}) > 10  # long-tailed, clipped
    assert min(min(x) for x in ids) >= 3 and max(max(x) for x in ids) < 600
    narrow = build_token_dataset(64, 512, 600, seed=1, low_id=100, high_id=598)["input_ids"]
    assert [len(x) for x in narrow] == [len(x) for x in ids]  # the id range does not move the lengths
    assert min(min(x) for x in narrow) >= 100 and max(max(x) for x in narrow) < 598
    fixed = build_token_dataset(8, 512, 600, fixed_length=300)["input_ids"]
    assert [len(x) for x in fixed] == [300] * 8
    assert build_token_dataset(8, 512, 600, seed=2)["input_ids"] == build_token_dataset(8, 512, 600, seed=2)["input_ids"]
