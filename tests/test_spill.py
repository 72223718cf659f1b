"""The batch store: arrays reserved and filled in place, spilled ones mapped from the file, files written over."""

import numpy as np

from onnxq.data.spill import BatchStore, _maps_a_file


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
