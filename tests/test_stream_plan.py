"""bnstat.stream's row planner: plan_rows / slab_rows / slabs / source_rows, by their exact slices."""

from __future__ import annotations

import numpy as np
import pytest

from bnstat.stream import plan_rows, slab_rows, slabs, source_rows


def spans(plan):
    return [(s.start, s.stop) for s in plan]


def test_even_slabs_and_a_ragged_last_one():
    # 100-byte rows, 1000-byte chunks: 10 rows a slab; 25 rows -> 10, 10, 5
    assert spans(plan_rows(25, 100, 1000)) == [(0, 10), (10, 20), (20, 25)]
    assert spans(plan_rows(20, 100, 1000)) == [(0, 10), (10, 20)]


def test_chunk_size_not_a_multiple_of_the_row_size_rounds_down():
    assert spans(plan_rows(7, 300, 1000)) == [(0, 3), (3, 6), (6, 7)]


def test_rows_larger_than_the_chunk_size_make_one_row_slabs():
    assert spans(plan_rows(3, 5000, 1000)) == [(0, 1), (1, 2), (2, 3)]


def test_zero_and_one_row():
    assert plan_rows(0, 100, 1000) == []
    assert spans(plan_rows(1, 100, 1000)) == [(0, 1)]
    assert spans(plan_rows(1, 10**9, 1)) == [(0, 1)]


def test_everything_fits_in_one_slab():
    assert spans(plan_rows(5, 100, 10**6)) == [(0, 5)]


def test_multiple_of_rounds_down_to_whole_multiples():
    # 10 rows fit; multiples of 4 -> 8 rows a slab, ragged last slab
    assert spans(plan_rows(21, 100, 1000, multiple_of=4)) == [(0, 8), (8, 16), (16, 21)]


def test_multiple_of_larger_than_what_fits_gives_one_multiple():
    # HDF5 chunks of 16 rows, a 1000-byte budget holds 10 rows: whole chunks anyway
    assert spans(plan_rows(40, 100, 1000, multiple_of=16)) == [(0, 16), (16, 32), (32, 40)]
    assert spans(plan_rows(5, 100, 1000, multiple_of=16)) == [(0, 5)]


def test_two_buffers_halve_the_slab():
    assert spans(plan_rows(25, 100, 1000, buffers=2)) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25)]


def test_task_splitting_into_slabs_of_whole_hdf5_chunks():
    """A Dask splitter: 1 MiB tasks of a dataset chunked by 100 rows of 4 KiB."""
    plan = plan_rows(1050, 4096, 1 << 20, multiple_of=100)
    # 256 rows fit -> 200 (two whole chunks) per task
    assert spans(plan) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000), (1000, 1050)]
    assert all(s.start % 100 == 0 for s in plan)


def test_slabs_cover_every_row_once():
    for n in (0, 1, 2, 7, 64, 65):
        for rows in (1, 3, 8, 100):
            got = np.concatenate([np.arange(n)[s] for s in slabs(n, rows)] or [np.arange(0)])
            assert got.tolist() == list(range(n))
            assert all(s.stop - s.start == rows for s in slabs(n, rows)[:-1])


def test_slab_rows_never_exceeds_n():
    assert slab_rows(3, 1, 10**6) == 3
    assert slab_rows(0, 1, 10**6) == 1  # a reader asked for rows of an empty array gets 1


@pytest.mark.parametrize(("chunks", "multiple", "rows", "raw_rows"), [
    ((4, 5), 1, 20, 40),   # 1600 B budget / 2 buffers / 40 B rows = 20 rows: whole chunks of 4
    ((3, 5), 2, 18, 36),   # lcm(3, 2) = 6 fits: 20 rows -> 18
    ((7, 5), 8, 16, 40),   # lcm 56 rows do not fit 800 B: multiples of 8 only (20 -> 16)
])
def test_source_rows_combines_hdf5_chunks_with_groups_or_batches(tmp_path, chunks, multiple, rows,
                                                                  raw_rows):
    """A deflated dataset is read by HDF5 into two slab buffers (half the budget each); an
    unfiltered one as runs of the file, one window (the whole budget: 40 rows)."""
    h5py = pytest.importorskip("h5py", reason="HDF5 sources")
    from bnstat.io import open_sources

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((64, 5), np.float64), chunks=chunks, compression="gzip")
        f.create_dataset("raw", data=np.zeros((64, 5), np.float64), chunks=chunks)
    (src,) = open_sources([str(tmp_path / "a.h5")], ["x"])
    assert src.double_buffered
    assert source_rows(src, 1600, multiple_of=multiple) == rows
    (src,) = open_sources([str(tmp_path / "a.h5")], ["raw"])
    assert not src.double_buffered
    assert source_rows(src, 1600, multiple_of=multiple) == raw_rows
