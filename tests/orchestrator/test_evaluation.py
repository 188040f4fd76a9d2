"""Evaluating a checkpoint without Ray: the numbers equal a hand count, both file layouts load, a mismatch is
refused before Ray, the eval transform comes from the checkpoint, and the evaluations table."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from orchestrator import evaluation
from orchestrator.collate.evaluations import evaluation_markdown, evaluation_table
from orchestrator.config.loading import load_config
from orchestrator.preflight import PreflightError
from orchestrator.weights import WeightsError, read_weights
from slak_model import create_model
from slak_model.published import reference_cell
from tests.orchestrator.checkpoint_files import (
    CLASSES,
    image_tree,
    official_checkpoint,
    our_checkpoint,
    tiny_cfg,
)
from tests.orchestrator.sessions import CpuSession


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return image_tree(tmp_path / "images")


def _by_hand(model: torch.nn.Module, root: Path, cfg) -> tuple[float, float]:
    """Top-1 and top-3 (%) over ``root/val`` read one image at a time with timm's own normalising transform."""
    transform = create_transform(input_size=cfg.data.image_size, is_training=False, interpolation="bicubic",
                                 crop_pct=cfg.data.crop_pct)
    model.eval()
    top1 = top3 = n = 0
    with torch.no_grad():
        for label, c in enumerate(CLASSES):
            for path in sorted((root / "val" / c).iterdir()):
                logits = model(transform(Image.open(path).convert("RGB")).unsqueeze(0))[0]
                ranked = logits.argsort(descending=True).tolist()
                top1 += ranked[0] == label
                top3 += label in ranked[:5]
                n += 1
    return 100.0 * top1 / n, 100.0 * top3 / n


def _evaluate(cfg, path: Path) -> dict[str, float]:
    contents = read_weights(path)
    plan = evaluation.plan_evaluation(cfg, contents)
    session = CpuSession()
    metrics = evaluation.run_evaluation_worker(
        {"experiment": cfg, "checkpoint": str(path), "sha256": plan.sha256, "run_name": plan.run_name}, session)
    assert session.reports == [metrics]
    return metrics


def test_our_checkpoint_evaluates_to_the_hand_count_for_model_and_ema(tmp_path: Path, folder: Path) -> None:
    cfg = tiny_cfg(folder, **{"data.crop_pct": 0.9})
    ckpt = our_checkpoint(tmp_path / "epoch_0001", cfg)
    metrics = _evaluate(cfg, ckpt)
    contents = read_weights(ckpt)
    for prefix, weights in (("val", contents.model), ("ema", contents.ema)):
        model = create_model("slak_test", num_classes=3)
        model.load_state_dict(weights)
        top1, top5 = _by_hand(model, folder, cfg)
        assert metrics[f"{prefix}/top1"] == pytest.approx(top1) and metrics[f"{prefix}/top5"] == pytest.approx(top5)
    assert metrics["eval/images"] == 9
    assert metrics["val/top1"] != metrics["ema/top1"] or metrics["val/loss"] != metrics["ema/loss"]


def test_official_layout_loads_model_and_ema_with_its_eval_transform(tmp_path: Path, folder: Path) -> None:
    torch.manual_seed(1)
    model, ema = create_model("slak_test", num_classes=3), create_model("slak_test", num_classes=3)
    path = official_checkpoint(tmp_path / "SLaK_test.pth", model, ema, input_size=32, model="SLaK_test",
                               epochs=300, kernel_size=[13, 11, 9, 7, 3], Decom=True, train_interpolation="bicubic")
    contents = read_weights(path)
    assert contents.layout == "official" and contents.ema is not None and "optimizer" in contents.unused
    cfg = load_config(None, {"data.source": "imagenet", "data.path": str(folder), "run.num_workers": 1,
                             "tracking.enabled": False}, defaults=evaluation.checkpoint_defaults(contents))
    assert (cfg.data.image_size, cfg.data.crop_pct) == (32, 0.875)  # the reference's eval transform below 384
    assert cfg.model.stage_kernels == [13, 11, 9, 7] and cfg.model.short_edge == 3
    metrics = _evaluate(cfg, path)
    for prefix, m in (("val", model), ("ema", ema)):
        assert metrics[f"{prefix}/top1"] == pytest.approx(_by_hand(m, folder, cfg)[0])


def test_generated_source_evaluates_the_training_runs_val_split(tmp_path: Path) -> None:
    cfg = tiny_cfg(None, **{"train.ema": False})
    ckpt = our_checkpoint(tmp_path / "ckpt", cfg)
    defaults = evaluation.checkpoint_defaults(read_weights(ckpt / "state.pt"))
    assert defaults["data.source"] == "shapes" and defaults["model.variant"] == "slak_test"
    metrics = _evaluate(cfg, ckpt / "state.pt")
    assert set(metrics) == {"val/top1", "val/top5", "val/loss", "eval/images"} and metrics["eval/images"] == 12


def test_wrong_kernels_are_refused_before_ray_with_the_fix(tmp_path: Path, folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = official_checkpoint(tmp_path / "t.pth", create_model("slak_test", num_classes=3))
    cfg = tiny_cfg(folder, **{"model.stage_kernels": [15, 11, 9, 7]})
    pytest.importorskip("ray")
    from orchestrator import ray_train

    def no_ray(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("Ray was started (or joined) before the checkpoint was checked")

    monkeypatch.setattr(ray_train, "_ensure_ray", no_ray)  # another test may already hold a Ray in this process
    with pytest.raises(PreflightError, match=r"wrong kernel sizes.*kernel_size=\[13, 11, 9, 7, 3\]"):
        ray_train.run_evaluation(cfg, read_weights(path))


def test_wrong_class_count_is_named(tmp_path: Path, folder: Path) -> None:
    path = official_checkpoint(tmp_path / "t.pth", create_model("slak_test", num_classes=5))
    with pytest.raises(PreflightError, match="the classifier has 5 classes in the checkpoint"):
        evaluation.plan_evaluation(tiny_cfg(folder), read_weights(path))


@pytest.mark.parametrize("case", ["missing", "not-a-checkpoint", "folder-without-manifest", "ema-only"])
def test_unreadable_paths_name_the_problem(tmp_path: Path, case: str) -> None:
    path = tmp_path / "x.pth"
    if case == "not-a-checkpoint":
        path.write_text("hello")
    elif case == "folder-without-manifest":
        path.mkdir()
    elif case == "ema-only":
        torch.save({"model_ema": to_ref()}, path)
    needle = {"missing": "no such file", "not-a-checkpoint": "cannot be read as a checkpoint",
              "folder-without-manifest": "without manifest.json", "ema-only": "only `model_ema`"}[case]
    with pytest.raises(WeightsError, match=needle):
        read_weights(path)


def to_ref() -> dict[str, torch.Tensor]:
    from slak_model.checkpoint import to_reference_state_dict

    return to_reference_state_dict(create_model("slak_test"))


def test_reference_384_eval_transform_is_a_direct_resize(tmp_path: Path) -> None:
    path = official_checkpoint(tmp_path / "b384.pth", create_model("slak_test"), input_size=384, crop_pct=None,
                               train_interpolation="bicubic")
    contents = read_weights(path)
    assert {k: contents.recipe[k] for k in evaluation.EVAL_TRANSFORM} == {
        "data.image_size": 384, "data.crop_pct": 1.0, "data.interpolation": "bicubic", "data.crop_mode": "squash"
    }
    cfg = load_config(None, {"data.image_size": 224}, defaults=evaluation.checkpoint_defaults(contents))
    assert any("data.image_size=224 differs from the checkpoint's 384" in line
               for line in evaluation.transform_differences(cfg, contents))


def test_the_cli_refuses_a_missing_file_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", Path(__file__).parents[2] / "experiments" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(("variant", "size", "epochs", "kernels", "top1"), [
    ("slak_tiny", 224, 300, (51, 49, 47, 13), 82.5),
    ("slak_tiny", 224, None, (51, 49, 47, 13), 82.5),
    ("slak_base", 384, 30, (51, 49, 47, 13), 85.5),
    ("slak_tiny", 224, 120, (31, 29, 27, 13), 81.5),
    ("slak_tiny", 224, 120, (7, 7, 7, 7), 81.1),
    ("slak_test", 32, 2, (13, 11, 9, 7), None),
    ("slak_small", 384, 300, (51, 49, 47, 13), None),
], ids=["T300", "T-unrecorded", "B384-finetune", "T120-31", "T120-7", "test", "S384"])
def test_reference_cell(variant, size, epochs, kernels, top1) -> None:
    cell = reference_cell(variant, size, epochs, kernels)
    assert (cell.top1 if cell else None) == top1


def test_evaluation_table_puts_the_paper_beside_and_deltas_only_on_images() -> None:
    runs = pd.DataFrame([
        {"run_id": "a", "status": "FINISHED", "start_time": 2, "tags.slak.role": "eval",
         "tags.slak.checkpoint": "/w/SLaK_tiny.pth", "tags.slak.checkpoint_sha256": "ab" * 32,
         "tags.slak.published": "SLaK-T 224 px, 300 ep: 82.5", "tags.slak.published_top1": "82.5",
         "params.model.variant": "slak_tiny", "params.data.image_size": "224", "params.data.source": "imagenet",
         "metrics.val/top1": 82.1, "metrics.val/top5": 96.0, "metrics.ema/top1": 82.4, "metrics.ema/top5": 96.1},
        {"run_id": "b", "status": "FINISHED", "start_time": 1, "tags.slak.role": "eval",
         "tags.slak.checkpoint": "/r/epoch_0002/state.pt", "params.model.variant": "slak_test",
         "params.data.image_size": "32", "params.data.source": "shapes", "metrics.val/top1": 40.0},
        {"run_id": "c", "status": "FINISHED", "start_time": 3, "tags.slak.role": "train"},
    ])
    table = evaluation_table(runs)
    assert list(table["run_id"]) == ["a", "b"]
    assert table.loc[0, "delta"] == pytest.approx(-0.1) and math.isnan(table.loc[1, "delta"])
    text = evaluation_markdown(table)
    assert "| SLaK_tiny.pth | abababababab | slak_tiny | 224 | imagenet | 82.10 |" in text
    assert "SLaK-T 224 px, 300 ep: 82.5 | -0.10 |" in text
