"""The out-of-core shuffle: parts keep their rows' order in memory and on disk, range parts cut strings in order."""

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_scripts.spill import RangeParts, Spill, route

SCHEMA = {"id": pl.String, "value": pl.Int64}


def frame(first: int, n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"r{i}" for i in range(first, first + n)], "value": np.arange(first, first + n)})


def test_a_part_reads_back_in_append_order_from_memory_and_files(tmp_path):
    spill = Spill(tmp_path, budget=frame(0, 10).estimated_size() * 3)  # about three frames fit in memory
    for first in range(0, 100, 10):
        spill.append("numbers", first // 10 % 2, frame(first, 10))
    assert list(tmp_path.iterdir()), "past the budget the frames go to files"
    even = spill.read("numbers", 0, SCHEMA)
    assert even["value"].to_list() == [v for first in range(0, 100, 20) for v in range(first, first + 10)]
    odd = list(spill.frames("numbers", 1))
    assert max(len(part) for part in odd) <= 10, "read back no larger than appended"
    assert pl.concat(odd)["value"].to_list() == [v for first in range(10, 100, 20) for v in range(first, first + 10)]
    assert not list(tmp_path.iterdir()), "a part read is forgotten, its files deleted"
    assert spill.read("numbers", 0, SCHEMA).equals(pl.DataFrame(schema=SCHEMA))


def test_keep_reads_a_part_again(tmp_path):
    spill = Spill(tmp_path, budget=0)  # everything to files
    spill.append("numbers", 3, frame(0, 5))
    spill.append("numbers", 3, frame(5, 5))
    kept = spill.read("numbers", 3, SCHEMA, keep=True)
    assert kept.equals(frame(0, 10)) and spill.read("numbers", 3, SCHEMA).equals(frame(0, 10))
    assert not list(tmp_path.iterdir())


def test_without_a_folder_everything_stays_in_memory():
    spill = Spill(None)
    spill.append("numbers", 0, frame(0, 1000))
    assert spill.read("numbers", 0, SCHEMA).equals(frame(0, 1000))


def test_route_keeps_each_parts_rows_in_order(tmp_path):
    spill = Spill(tmp_path, budget=1 << 20)
    rows = frame(0, 1000)
    part_of_row = np.random.default_rng(0).integers(0, 7, 1000)
    route(spill, "numbers", rows, part_of_row, 7)
    for part in range(7):
        assert spill.read("numbers", part, SCHEMA)["value"].to_list() == np.flatnonzero(part_of_row == part).tolist()


strings = st.lists(st.text(min_size=0, max_size=5), unique=True, min_size=1, max_size=400)


@given(strings, st.integers(1, 60), st.integers(1, 50))
@settings(max_examples=200, deadline=None)
def test_range_parts_cut_strings_in_polars_order(listed, part_size, batch):
    ids = pl.Series(listed, dtype=pl.String)
    parts = RangeParts.sampled((ids.slice(first, batch) for first in range(0, len(ids), batch)), len(ids), part_size)
    assert len(parts) <= -(-len(ids) // part_size)
    part = parts.of(ids)
    assert ((part >= 0) & (part < len(parts))).all()
    # Parts in order, each sorted, give the sorted strings: every string of part j sorts before those of part j + 1.
    in_parts = pl.concat([ids.filter(pl.Series(part == j)).sort() for j in range(len(parts))])
    assert in_parts.to_list() == ids.sort().to_list()


def test_range_parts_are_about_the_part_size():
    ids = pl.Series([f"id{value}" for value in np.random.default_rng(1).permutation(200_000)])
    parts = RangeParts.sampled([ids], len(ids), 20_000)
    sizes = np.bincount(parts.of(ids), minlength=len(parts))
    assert len(parts) == 10 and sizes.max() <= 21_000 and sizes.min() >= 19_000
