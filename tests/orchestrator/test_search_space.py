"""Grids of the paper: paired points, kernel scaling, CLI points, and validation before Ray starts."""

from __future__ import annotations

import pytest

from orchestrator import search_space as ss
from orchestrator.config.loading import load_config
from orchestrator.search_space import GridError, GridPoint


@pytest.fixture(scope="module")
def base():
    return load_config(None, {"data.image_size": 64})


def test_table8_is_paired_not_a_cross_product(base) -> None:
    points = ss.sparsity_width_grid(base)
    pairs = [(p.overrides["sparse.sparsity"], p.overrides["model.width_factor"]) for p in points]
    assert pairs == [(0.20, 1.1), (0.40, 1.3), (0.55, 1.5), (0.70, 1.9), (0.82, 2.5)]
    assert [p.row for p in points] == ["0.20/1.1x", "0.40/1.3x", "0.55/1.5x", "0.70/1.9x", "0.82/2.5x"]
    space = ss.param_space(points, seeds=2, constants={"experiment": "x"})
    assert len(space["point"]["grid_search"]) == 5  # one grid over whole points: 5 x 2 seeds = 10 trials
    assert space["seed_index"]["grid_search"] == [0, 1] and space["experiment"] == "x"


def test_extra_points_get_their_own_rows(base) -> None:
    extra = ss.parse_point("sparse.sparsity=0.9,model.width_factor=3.0", "table8")
    assert extra.overrides == {"sparse.sparsity": 0.9, "model.width_factor": 3.0}
    points = ss.sparsity_width_grid(base, extra_pairs=[(0.9, 3.0)])
    assert points[-1].row == "0.90/3x" and len(points) == 6


def test_parse_point_keeps_list_values_and_rejects_garbage() -> None:
    point = ss.parse_point("model.stage_kernels=[9,9,7,5],sparse.enabled=false", "table2")
    assert point.overrides == {"model.stage_kernels": [9, 9, 7, 5], "sparse.enabled": False}
    with pytest.raises(ValueError, match="dotted.name=value"):
        ss.parse_point("sparse.sparsity", "table8")


@pytest.mark.parametrize(
    "size,short_edge,image_size,expected",
    [
        pytest.param(51, 5, 224, [51, 49, 47, 13], id="224px-unchanged"),
        pytest.param(51, 5, 384, [51, 49, 47, 13], id="384px-never-enlarged"),
        pytest.param(51, 5, 64, [15, 15, 13, 5], id="64px-51"),
        pytest.param(31, 5, 64, [9, 9, 7, 5], id="64px-31"),
        pytest.param(61, 5, 64, [17, 17, 17, 5], id="64px-61"),
        pytest.param(7, 5, 64, [5, 5, 5, 5], id="64px-7-floored-at-N"),
        pytest.param(51, 3, 32, [7, 7, 7, 3], id="32px-N3"),
        pytest.param(51, 7, 32, [7, 7, 7, 7], id="32px-N7"),
    ],
)
def test_kernel_scaling(size: int, short_edge: int, image_size: int, expected: list[int]) -> None:
    scaled = ss.scale_kernel_sizes(ss.PAPER_KERNELS[size], short_edge, image_size)
    assert scaled == expected
    assert all(k % 2 == 1 for k in scaled)


@pytest.mark.parametrize(
    "table,count,settings",
    [
        pytest.param("table1", 7, {"naive", "replknet"}, id="table1"),
        pytest.param("table2", 12, {"decomposed", "sparse_groups", "sparse_groups_wide"}, id="table2"),
        pytest.param("table9", 3, {"slak"}, id="table9"),
        pytest.param("adapt_p", 4, {"slak"}, id="adapt_p"),
        pytest.param("adapt_f", 4, {"slak"}, id="adapt_f"),
        pytest.param("table8", 5, {"slak"}, id="table8"),
    ],
)
def test_every_grid_builds_and_validates(base, table: str, count: int, settings: set[str]) -> None:
    points = ss.build_grid(base, table)
    assert len(points) == count and {p.setting for p in points} == settings
    assert len({p.label for p in points}) == count
    configs = ss.validate_points(base, points)
    assert len(configs) == count


def test_adaptation_sweeps_fix_the_other_knob(base) -> None:
    p_points = ss.adaptation_grid(base, "p", [0.2, 0.4])
    assert [(p.overrides["sparse.prune_rate"], p.overrides["sparse.update_frequency"]) for p in p_points] == [
        (0.2, 100),
        (0.4, 100),
    ]
    f_points = ss.adaptation_grid(base, "f", [10, 20])
    assert {p.overrides["sparse.prune_rate"] for p in f_points} == {0.3}
    with pytest.raises(ValueError, match="sweep='q'"):
        ss.adaptation_grid(base, "q")


def test_table2_sparse_groups_use_the_recipe(base) -> None:
    cells = {(p.row, p.setting): p.overrides for p in ss.kernel_size_grid(base, "table2")}
    wide = cells[("51-49-47-13", "sparse_groups_wide")]
    assert wide["sparse.sparsity"] == 0.4 and wide["model.width_factor"] == 1.3 and wide["sparse.enabled"]
    assert cells[("51-49-47-13", "decomposed")]["sparse.enabled"] is False


@pytest.mark.parametrize("table", ["table1", "table2", "table8", "table9", "adapt_p", "adapt_f"])
def test_kernel_axes_set_the_typed_fields(base, table: str) -> None:
    for point in ss.build_grid(base, table):
        assert "model.kernel_size" not in point.overrides
        assert len(point.overrides["model.stage_kernels"]) == 4
        assert point.overrides["model.small_kernel"] == point.overrides["model.short_edge"]
    table9 = {p.row: p.overrides["model.short_edge"] for p in ss.build_grid(base, "table9")}
    assert table9 == {"N=3": 3, "N=5": 5, "N=7": 7}


def test_points_recorded_with_the_kernel_size_shorthand_still_build(base) -> None:
    """Tune restores a stored param space as it was written, the reference's shorthand included."""
    legacy = GridPoint("table9", "N=5", "slak", {"model.kernel_size": [15, 15, 13, 5, 5]})
    (cfg,) = ss.validate_points(base, [legacy])
    assert (cfg.model.stage_kernels, cfg.model.short_edge, cfg.model.small_kernel) == ([15, 15, 13, 5], 5, 5)


def test_every_bad_point_is_listed_in_one_error(base) -> None:
    good = ss.sparsity_width_grid(base)[0]
    bad = [
        GridPoint("table8", "s1", "extra", {"sparse.sparsity": 1.0}),
        GridPoint("table8", "w0", "extra", {"model.width_factor": 0.0}),
        GridPoint("table8", "even", "extra", {"model.stage_kernels": [8, 7, 7, 7]}),
    ]
    with pytest.raises(GridError) as info:
        ss.validate_points(base, [good, *bad, good])
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    for needle in (
        "point #1 (s1",
        "sparse.sparsity",
        "point #2 (w0",
        "model.width_factor",
        "point #3 (even",
        "model.stage_kernels=[8, 7, 7, 7]: must be 4 odd",
        "point #4",
        "duplicates point #0",
    ):
        assert needle in text, text


def test_empty_grid_and_bad_seed_count_are_rejected(base) -> None:
    with pytest.raises(GridError) as info:
        ss.validate_points(base, [], seeds=0)
    assert len(info.value.problems) == 2


def test_unknown_table_names_the_choices(base) -> None:
    with pytest.raises(ValueError, match="table8"):
        ss.build_grid(base, "table99")


def test_points_round_trip_through_plain_dicts() -> None:
    point = GridPoint("table9", "N=5", "slak", {"model.stage_kernels": [15, 15, 13, 5], "model.short_edge": 5})
    assert GridPoint.from_dict(point.to_dict()) == point
    assert point.label == "N_5__slak"


def test_model_architecture_problems_are_caught_before_ray(base) -> None:
    # a valid experiment config, but the short edge N=9 is longer than the stage-4 kernel 7
    bad = GridPoint(
        "table9", "N=9", "slak", {"model.stage_kernels": [15, 15, 13, 7], "model.short_edge": 9,
                                  "model.kernel_mode": "decomposed"}
    )
    with pytest.raises(GridError, match="short_edge"):
        ss.validate_points(base, [bad])


@pytest.mark.parametrize("table", ["table1", "table2", "table8", "table9"])
def test_grid_cells_are_exactly_the_papers_cells(base, table: str) -> None:
    from orchestrator import paper

    published = paper.published_cells(table)
    assert len(published) > 0
    grid = {(p.row, p.setting) for p in ss.build_grid(base, table)}
    assert grid == set(zip(published["row"], published["setting"], strict=True))


def test_sweeps_without_printed_numbers_have_no_published_cells() -> None:
    from orchestrator import paper

    assert paper.published_cells("adapt_p").empty


@pytest.mark.parametrize("grid, kwargs, name, ignored", [
    ("sparsity_width_grid", {}, "sparse.sparsity", True),  # every Table 8 point sets its own
    ("sparsity_width_grid", {}, "sparse.prune_rate", False),
    ("kernel_size_grid", {"table": "table1"}, "sparse.prune_rate", True),  # all of Table 1 is dense
    ("kernel_size_grid", {"table": "table2"}, "sparse.prune_rate", False),  # Table 2 has sparse points
    ("adaptation_grid", {"sweep": "p"}, "sparse.prune_rate", True),
])
def test_settings_every_point_overrides_are_named(grid: str, kwargs: dict, name: str, ignored: bool) -> None:
    base = load_config(None, {name: 0.45, "data.image_size": 64})
    points = getattr(ss, grid)(base, **kwargs)
    lines = ss.settings_the_grid_ignores(base, points, [name, "train.epochs"])
    assert [line.split("=")[0] for line in lines] == ([name] if ignored else [])
    assert all("has no effect" in line for line in lines)


def test_the_parent_run_logs_the_grids_axes_not_the_base_values(base) -> None:
    from orchestrator.config.loading import replace
    from orchestrator.tune_runner import grid_params

    cfg = replace(base, {"tune.seeds": 3, "train.seed": 5})
    params = grid_params(cfg, ss.sparsity_width_grid(cfg))
    assert "sparse.sparsity" not in params and "model.width_factor" not in params and "train.seed" not in params
    assert params["grid.sparse.sparsity"] == [0.20, 0.40, 0.55, 0.70, 0.82]
    assert params["grid.model.width_factor"] == [1.1, 1.3, 1.5, 1.9, 2.5]
    assert params["grid.train.seed"] == [5, 6, 7] and params["grid.points"][0] == "0.20_1.1x__slak"
    assert params["data.image_size"] == 64  # shared by every trial: logged under its own name
    assert params["sparse.enabled"] is True and "grid.sparse.enabled" not in params  # set by every point alike


def test_the_estimate_times_each_point_on_cpu(base) -> None:
    from orchestrator.config.loading import replace
    from orchestrator.estimate import estimate_grid

    cfg = replace(base, {"run.use_gpu": False, "run.num_workers": 1, "data.image_size": 32, "train.epochs": 2,
                         "data.train_size": 64})
    points = ss.sparsity_width_grid(cfg)[:2]
    found = estimate_grid(cfg, points, seeds=3, concurrent=2)
    assert found is not None and found.trials == 6 and found.seconds > 0 and "6 trial(s), 2 at once" in found.describe()
    assert estimate_grid(replace(cfg, {"run.use_gpu": True}), points, seeds=1, concurrent=1) is None
