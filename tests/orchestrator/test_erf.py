"""The ERF job (orchestrator.erf): one clear error per bad input, the reference's image order and transform,
the table beside the published Table 10, and a whole run on a tiny model, with and without MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator import erf
from orchestrator.config import ConfigError
from orchestrator.erf import images as erf_images
from orchestrator.erf import models as erf_models
from slak_model import CheckpointMismatchError, create_model, variant_config


def _pngs(folder: Path, count: int, size: tuple[int, int] = (40, 52), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    _pngs(tmp_path / "images", 4)
    return tmp_path / "images"


def _settings(folder: Path, tmp_path: Path, /, **kw) -> erf.ErfSettings:
    base = {"random_init": True, "data": str(folder), "images": 3, "size": 64, "batch_size": 2, "workers": 0,
            "device": "cpu", "out": str(tmp_path / "out")}
    return erf.make_settings(kw.pop("model", "slak_test"), **{**base, **kw})


def _one_problem(folder: Path, tmp_path: Path, /, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        _settings(folder, tmp_path, **kw)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


# ---------------------------------------------------------------------------------- one clear error each
@pytest.mark.parametrize("kw,fragment", [
    ({"data": "/no/such/folder"}, "no such folder"),
    ({"size": 16}, "--size 16: at least 32 px"),
    ({"size": 0}, "--size 0"),
    ({"images": 0}, "--images 0: at least 1"),
    ({"images": 9}, "holds only 4 image(s)"),
    ({"batch_size": 0}, "--batch 0"),
    ({"workers": -1}, "--workers -1"),
    ({"precision": "fp16"}, "--precision 'fp16'"),
    ({"device": "tpu"}, "--device 'tpu'"),
    ({"random_init": False}, "no weights"),
    ({"model": "resnet10t", "pretrained": True}, "exclude each other"),
    ({"random_init": False, "pretrained": True}, "timm has no download for the SLaK variant"),
    ({"random_init": False, "checkpoint": "/no/such.pth"}, "--checkpoint '/no/such.pth': no such file"),
    ({"model": "slak_tny"}, "neither a SLaK variant"),
    ({"model": "resnet18", "overrides": ["model.width_factor=2"]}, "timm model, whose architecture is fixed"),
    ({"overrides": ["model.stage_kernels=[8,7,7,7]"]}, "odd positive integers"),
    ({"overrides": ["model.drop_path_rate=0.1"]}, "no effect in eval mode"),
    ({"overrides": ["model.variant=slak_tiny"]}, "use --model"),
    ({"overrides": ["train.lr=0.1"]}, "only model.* (SLaK variants) and tracking.*"),
    ({"overrides": ["tracking.log_every_steps=5"]}, "reads only tracking."),
    ({"overrides": ["tracking.experiment=erf"]}, "no effect without --tracking-uri"),
    ({"name": "a/b"}, "--name 'a/b'"),
])
def test_each_bad_input_gets_one_clear_error(images: Path, tmp_path: Path, kw: dict, fragment: str) -> None:
    assert fragment in _one_problem(images, tmp_path, **kw)


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in _one_problem(empty, tmp_path)
    root = tmp_path / "imagenet"
    _pngs(root / "train" / "a", 1)
    _pngs(root / "val" / "a", 1)
    assert f"pass {str(root / 'val')!r}" in _one_problem(root, tmp_path)


def test_benchmark_refuses_what_it_would_ignore(images: Path, tmp_path: Path) -> None:
    for kw, fragment in (({"out": "x"}, "--out"), ({"name": "x"}, "--name"),
                         ({"tracking_uri": "sqlite:///x.db"}, "--tracking-uri"),
                         ({"data": None, "workers": 2}, "--workers")):
        base = {"random_init": True, "device": "cpu", "data": str(images), "images": 4, **kw}
        with pytest.raises(ConfigError) as info:
            erf.make_settings("slak_test", benchmark=True, **base)
        assert len(info.value.problems) == 1 and fragment in info.value.problems[0]
    settings = erf.make_settings("slak_test", benchmark=True, device="cpu")
    assert settings.data is None and settings.checkpoint is None and settings.benchmark_precisions == ("fp32", "bf16")
    assert erf.make_settings("slak_test", benchmark=True, device="cpu", precision="bf16").benchmark_precisions == (
        "bf16",)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_an_error(images: Path, tmp_path: Path) -> None:
    assert "CUDA is not available" in _one_problem(images, tmp_path, device="cuda")


def test_several_problems_are_reported_together(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _settings(images, tmp_path, size=8, images=0, precision="x")
    assert len(info.value.problems) == 3


def test_defaults_resolve(images: Path, tmp_path: Path) -> None:
    s = erf.make_settings("slak_test", random_init=True, data=str(images), images=2, device="cpu")
    assert (s.precision, s.size, s.batch_size, s.out, s.label, s.tracking) == ("fp32", 1024, 8, "erf_results",
                                                                             "slak_test", None)
    assert s.workers >= 1
    tracked = _settings(images, tmp_path, tracking_uri=f"sqlite:///{tmp_path}/m.db",
                        overrides=["tracking.experiment=erf-test"])
    assert tracked.tracking.uri.endswith("m.db") and tracked.tracking.experiment == "erf-test"
    s = _settings(images, tmp_path, overrides=["model.kernel_size=[7,7,7,7,3]", "model.use_bn=false"])
    assert s.label == "slak_test-decomposed-7-7-7-7-N3-w1-use_bn=False"


# ---------------------------------------------------------------------------------- images
def test_image_order_is_imagefolders(tmp_path: Path) -> None:
    root = tmp_path / "val"
    for cls in ("n02", "n01"):
        for name in ("b.JPEG", "a.png", "c.txt"):
            (root / cls).mkdir(parents=True, exist_ok=True)
            (root / cls / name).write_bytes(b"")
    (root / "n01" / "deeper").mkdir()
    (root / "n01" / "deeper" / "z.jpg").write_bytes(b"")
    (root / "loose.png").write_bytes(b"")  # not in a class folder: ImageFolder does not list it
    names = [str(p.relative_to(root)) for p in erf.image_files(root)]
    assert names == ["n01/a.png", "n01/b.JPEG", "n01/deeper/z.jpg", "n02/a.png", "n02/b.JPEG"]
    flat = tmp_path / "flat"
    _pngs(flat, 3)
    assert [p.name for p in erf.image_files(flat)] == ["img00.png", "img01.png", "img02.png"]


def test_transform_is_the_references(tmp_path: Path) -> None:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms

    (path,) = _pngs(tmp_path, 1, size=(37, 61))
    reference = transforms.Compose([transforms.Resize((64, 64), interpolation=Image.BICUBIC), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    with Image.open(path) as im:
        expected = reference(im.convert("RGB"))
    ours, error = erf_images.ImageFolder([path], 64)[0]
    assert error == "" and ours.shape == (3, 64, 64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_an_unreadable_image_is_named(images: Path, tmp_path: Path) -> None:
    (images / "img01.png").write_bytes(b"not a png")
    settings = _settings(images, tmp_path, workers=1)
    with pytest.raises(erf.ErfError, match=r"cannot decode image .*img01\.png"):
        erf.run_erf(settings)


# ---------------------------------------------------------------------------------- weights
def test_a_checkpoint_of_another_variant_gets_the_loaders_diagnosis(images: Path, tmp_path: Path) -> None:
    other = create_model("slak_test", stage_kernels=(7, 7, 7, 7))
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    settings = _settings(images, tmp_path, random_init=False, checkpoint=str(tmp_path / "other.pth"))
    with pytest.raises(CheckpointMismatchError, match="wrong kernel sizes"):
        erf.run_erf(settings)


def test_checkpoints_load_and_bad_files_are_named(images: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    trained = create_model("slak_test")
    torch.save({"model": trained.state_dict()}, tmp_path / "ours.pth")
    model, info = erf.build_erf_model(_settings(images, tmp_path, random_init=False,
                                                checkpoint=str(tmp_path / "ours.pth")))
    assert torch.equal(model.stem[0].weight, trained.stem[0].weight) and info.kernel == "13-11-9-7"
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(erf.ErfError, match="cannot read checkpoint .*junk.pth"):
        erf.build_erf_model(_settings(images, tmp_path, random_init=False, checkpoint=str(tmp_path / "junk.pth")))
    with pytest.raises(erf.ErfError, match="does not fit timm model 'resnet10t'"):
        erf.build_erf_model(_settings(images, tmp_path, model="resnet10t", random_init=False,
                                      checkpoint=str(tmp_path / "ours.pth")))


def test_timm_checkpoints_load_through_timm(images: Path, tmp_path: Path) -> None:
    import timm

    torch.manual_seed(4)
    trained = timm.create_model("resnet10t")
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "r.pth")
    model, info = erf.build_erf_model(_settings(images, tmp_path, model="resnet10t", random_init=False,
                                                checkpoint=str(tmp_path / "r.pth")))
    assert torch.equal(model.conv1[0].weight, trained.conv1[0].weight)
    assert (info.kernel, info.paper_row) == ("-", None)


def test_which_published_row_a_model_is() -> None:
    assert erf_models.slak_paper_row(variant_config("slak_tiny")) == "SLaK-T"
    assert erf_models.slak_paper_row(variant_config("slak_small")) is None
    assert erf_models.slak_paper_row(variant_config("slak_tiny", kernel_mode="replknet", kernel_size=[31, 29, 27, 13, 5],
                                              width_factor=1.0)) == "ConvNeXt-T (RepLKNet)"
    assert erf_models.slak_paper_row(variant_config("slak_tiny", kernel_mode="naive", kernel_size=[7, 7, 7, 7, 100],
                                              width_factor=1.0)) == "ConvNeXt-T"
    assert erf_models.slak_paper_row(variant_config("slak_tiny", width_factor=1.0)) is None
    assert erf_models.timm_paper_row("resnet101.tv_in1k") == ("3-3-3-3", "ResNet-101")
    assert erf_models.timm_paper_row("convnext_tiny") == ("7-7-7-7", "ConvNeXt-T")
    assert erf_models.timm_paper_row("resnet50") == ("-", None)


# ---------------------------------------------------------------------------------- the job
def test_run_writes_map_heatmap_row_and_table(images: Path, tmp_path: Path) -> None:
    result = erf.run_erf(_settings(images, tmp_path))
    out = tmp_path / "out"
    assert {p.name for p in result.files} == {"slak_test.npy", "slak_test.png", "slak_test.erf.json", "erf_table.md",
                                              "erf_table.csv"}
    assert all(p.is_file() for p in result.files)
    assert np.load(out / "slak_test.npy").shape == (64, 64)
    with Image.open(out / "slak_test.png") as png:
        assert png.size[0] > 300
    row = json.loads((out / "slak_test.erf.json").read_text())
    assert (row["images"], row["size"], row["precision"], row["kernel"]) == (3, 64, "fp32", "13-11-9-7")
    assert 0 < row["r20_pct"] <= row["r30_pct"] <= row["r50_pct"] <= row["r99_pct"] <= 100
    assert row["side99"] % 2 == 1
    assert "| slak_test | - | 13-11-9-7 |" in result.markdown
    assert "| - | SLaK-T | 51-49-47-13 | - | - | - | - | 6.9 |" in result.markdown

    # a second model into the same folder joins the table; the published rows stay in the paper's order
    erf.run_erf(_settings(images, tmp_path, model="resnet10t", images=2))
    with (out / "erf_table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["paper_row"] for r in rows[:5]] == ["ResNet-101", "ResNet-152", "ConvNeXt-T", "ConvNeXt-T (RepLKNet)",
                                                 "SLaK-T"]
    assert {r["label"] for r in rows[5:]} == {"slak_test", "resnet10t"}
    assert rows[4]["paper_r99_pct"] == "97.5" and rows[4]["r99_pct"] == ""


def test_measured_rows_sit_under_their_published_row() -> None:
    rows = erf.table_rows([{"label": "mine", "paper_row": "SLaK-T", "kernel": "51-49-47-13", "r20_pct": 7.0}])
    assert [r["label"] for r in rows] == ["-", "-", "-", "-", "mine"]
    assert rows[-1]["paper_r20_pct"] == 6.9 and rows[-1]["r20_pct"] == 7.0
    assert "| mine | SLaK-T | 51-49-47-13 |" in erf.to_markdown(rows)


def test_run_logs_to_mlflow(images: Path, tmp_path: Path) -> None:
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = erf.run_erf(_settings(images, tmp_path, tracking_uri=uri, overrides=["tracking.experiment=erf-test",
                                                                                  f"tracking.offline_dir={tmp_path}/off"]))
    runs = tracking.runs_dataframe(uri, "erf-test")
    assert len(runs) == 1 and runs["run_id"][0] == result.run_id
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.slak.job"] == "erf" and run["params.model"] == "slak_test"
    assert run["metrics.erf/r20_pct"] == pytest.approx(result.row["r20_pct"])
    from mlflow.tracking import MlflowClient

    names = {a.path for a in MlflowClient(uri).list_artifacts(result.run_id, "erf")}
    assert {"erf/slak_test.png", "erf/slak_test.npy", "erf/erf_table.md", "erf/erf_table.csv"} <= names


def test_benchmark_times_both_precisions_on_cpu(images: Path) -> None:
    settings = erf.make_settings("slak_test", benchmark=True, device="cpu", size=64, images=4, batch_size=2)
    rows, extra = erf.run_benchmark(settings)
    assert [r.precision for r in rows] == ["fp32", "bf16"]
    assert all(r.seconds_per_image > 0 and r.images == 4 and r.peak_memory_gib is None for r in rows)
    assert extra["max_abs_diff"] >= 0 and extra["max_share_diff"] >= 0
    text = erf.benchmark_text(settings, rows, extra)
    assert "random initialisation" in text and "weights are RANDOM" in text and "| bf16 |" in text
