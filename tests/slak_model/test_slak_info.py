"""The published tables as data and ``python -m slak_model.info``."""

from __future__ import annotations

import pytest

from slak_model import info, published


@pytest.mark.parametrize(
    "table,cells", [("table1", 7), ("table2", 12), ("table3", 7), ("table8", 5), ("table9", 3)]
)
def test_published_tables_are_complete(table: str, cells: int) -> None:
    rows = published.published(table)
    assert len(rows) == cells
    assert all(r.top1 is not None and 79.0 < r.top1 < 86.0 for r in rows)


def test_table2_typo_is_corrected() -> None:
    rows = {r.row for r in published.published("table2")}
    assert rows == {"7-7-7-7", "31-29-27-13", "51-49-47-13", "61-59-57-13"}


def test_published_cells_by_key() -> None:
    cells = {(r.table, r.row, r.setting): r for r in published.PUBLISHED}
    assert cells[("table2", "51-49-47-13", "sparse_groups_wide")].top1 == 81.6
    assert cells[("table1", "31-29-27-13", "replknet")].flops_g == 6.1
    slak_t = cells[("table3", "SLaK-T", "224")]
    assert (slak_t.params_m, slak_t.dense_params_m, slak_t.flops_g, slak_t.dense_flops_g, slak_t.epochs) == (
        30,
        50,
        5.0,
        8.7,
        300,
    )
    assert cells[("table8", "0.55/1.5x", "slak")].top1 == 81.7
    assert cells[("table9", "N=3", "slak")].to_dict()["top1"] == 81.5
    with pytest.raises(ValueError, match="table4"):
        published.published("table4")


def test_info_rows_agree_with_the_paper() -> None:
    rows = info.info_rows()
    by_key = {(r.table, r.row, r.setting): r for r in rows}
    assert round(by_key[("variant", "slak_tiny", "dense")].params_m, 2) == 50.70
    assert round(by_key[("variant", "slak_base", "dense")].gmacs, 3) == 28.509
    for r in rows:  # dense paper rows agree to the paper's printed precision
        if r.sparsity == 0 and r.published_params_m is not None:
            assert abs(r.params_m - r.published_params_m) < 1.0, r  # the paper truncates (38.6M -> 38M)
            if r.table != "table1" or r.setting != "naive" or r.row == "7-7-7-7":
                assert abs(r.gmacs - r.published_gmacs) <= 0.1, r
    assert abs(by_key[("table3", "SLaK-B", "384")].gmacs - 50.3) < 0.05


def test_main_prints_the_table(capsys) -> None:
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "paper M" in out and "50.70" in out and "8.705" in out and "table9" in out
    assert info.main(["--bogus"]) == 2
