"""The batch store: arrays reserved and filled in place, spilled ones mapped from the file, files written over."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxq.data.spill import PAGE, BatchStore, SpillFile, _maps_a_file


def test_reserved_arrays_are_kept_where_they_were_filled(tmp_path):
    """Reserved arrays past the limit are maps of the file: filling them is the write, and they read back
    exactly; under the limit they are plain arrays kept by reference."""
    rng = np.random.default_rng(5)
    values = [rng.normal(size=(3, 7)).astype(np.float32) for _ in range(3)]
    store = BatchStore(tmp_path, limit=values[0].nbytes)
    reserved = []
    for value in values:
        array = store.reserve(value.shape, value.dtype)
        array[...] = value
        reserved.append(array)
        store.append({"x": array})
    assert store.in_memory == values[0].nbytes and store.spilled_bytes == 2 * values[0].nbytes
    assert store.batches[0]["x"] is reserved[0]
    assert _maps_a_file(reserved[1]) and not _maps_a_file(reserved[0])
    del reserved, array
    on_disk = np.fromfile(store.path, np.float32)
    np.testing.assert_array_equal(on_disk[:values[1].size], values[1].ravel())  # the map wrote the file
    for batch, value in zip(store, values, strict=True):
        np.testing.assert_array_equal(batch["x"], value)
    store.close()
    assert not any(tmp_path.iterdir())


def test_spilled_batches_read_back_as_private_maps(tmp_path):
    """A spilled batch reads back as a map of the file; writing to it leaves the file as it was."""
    store = BatchStore(tmp_path, limit=0)
    store.append({"x": np.arange(12, dtype=np.float32)})
    first = store[0]["x"]
    assert _maps_a_file(first)
    first[:] = -1
    np.testing.assert_array_equal(store[0]["x"], np.arange(12, dtype=np.float32))
    store.close()


def test_a_mapped_array_kept_in_memory_is_copied(tmp_path):
    """An array mapping another store's file is copied when kept in memory: that file is written over later."""
    spilled = BatchStore(tmp_path, limit=0)
    spilled.append({"x": np.arange(6, dtype=np.float32)})
    kept = BatchStore(tmp_path, limit=1 << 20)
    kept.append(spilled[0])
    spilled.clear()
    spilled.append({"x": np.zeros(6, np.float32)})
    np.testing.assert_array_equal(kept[0]["x"], np.arange(6, dtype=np.float32))
    spilled.close()
    kept.close()


def test_stores_sharing_a_file_write_over_released_batches(tmp_path):
    """Two stores spill into one ``SpillFile``: a batch released once read gives its pages to the next batch written
    (the file does not grow), neighbouring released ranges merge for a larger array, and the batches not released
    read back unchanged."""
    spill = SpillFile(tmp_path)
    read, write = BatchStore(tmp_path, limit=0, spill=spill), BatchStore(tmp_path, limit=0, spill=spill)
    values = [np.full(PAGE // 4, k, np.float32) for k in range(4)]  # one page each
    for value in values:
        read.append({"x": value})
    assert spill.end == 4 * PAGE
    read.release(0)
    read.release(1)  # merged with batch 0's range: two pages free at the start
    big = np.arange(PAGE // 2, dtype=np.float32)  # two pages
    array = write.reserve(big.shape, big.dtype)
    array[...] = big
    write.append({"y": array})
    assert spill.end == 4 * PAGE and spill.free == []
    np.testing.assert_array_equal(write[0]["y"], big)
    for index in (2, 3):
        np.testing.assert_array_equal(read[index]["x"], values[index])
    with pytest.raises(IndexError):
        read[0]
    read.clear()  # its last two pages free again
    write.append({"y": values[0][:10]})
    assert spill.end == 4 * PAGE and spill.free == [(3 * PAGE, PAGE)]
    read.close()
    write.close()
    assert spill.path.exists()  # shared: the stores do not delete it
    spill.close()
    assert not any(tmp_path.iterdir())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * PAGE)), min_size=1, max_size=40))
def test_spill_file_ranges_never_overlap_and_free_ranges_merge(steps):
    """Any sequence of allocations and releases: live ranges never overlap, free ranges stay sorted and apart, and
    live plus free ranges tile the used part of the file exactly."""
    spill = SpillFile(None)
    live: list[tuple[int, int]] = []
    try:
        for release, nbytes in steps:
            if release and live:
                offset, size = live.pop(nbytes % len(live))
                spill.release(offset, size)
            else:
                live.append((spill.allocate(nbytes), -(-nbytes // PAGE) * PAGE))
            ranges = sorted(live + spill.free)
            assert all(a + size <= b for (a, size), (b, _) in zip(ranges, ranges[1:], strict=False))
            assert sum(size for _, size in ranges) == spill.end
            assert all(a + size < b for (a, size), (b, _) in zip(spill.free, spill.free[1:], strict=False))
    finally:
        spill.close()
