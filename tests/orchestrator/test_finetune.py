"""Fine-tuning from a checkpoint without Ray: what is loaded, re-initialised and ignored on a class-count
change; another resolution; the three sparsity choices; layer-wise LR decay; and the checks before Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from orchestrator.config.validation import ConfigError
from orchestrator.loop import LR_LAYERS, Trainer, lr_layer_id, param_groups
from orchestrator.preflight import PreflightError, check_before_start
from orchestrator.weights import read_weights
from orchestrator.worker import TrainingWorker
from slak_model import create_model
from tests.orchestrator.checkpoint_files import image_tree, official_checkpoint, our_checkpoint, tiny_cfg
from tests.orchestrator.sessions import CpuSession


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return image_tree(tmp_path / "images")


@pytest.fixture
def five_class_checkpoint(tmp_path: Path) -> Path:
    """Our checkpoint of a sparse slak_test trained on 5 generated classes."""
    cfg = tiny_cfg(None, **{"data.num_classes": 5, "sparse.enabled": True, "sparse.init": "uniform"})
    return our_checkpoint(tmp_path / "pretrained", cfg, num_classes=5)


def _worker(cfg) -> tuple[TrainingWorker, CpuSession]:
    session = CpuSession()
    return TrainingWorker({"experiment": cfg, "run_name": "ft", "mlflow_run_id": None}, session), session


def test_new_class_count_loads_all_but_the_head_and_says_so(folder, five_class_checkpoint, caplog) -> None:
    cfg = tiny_cfg(folder, **{"finetune.checkpoint": str(five_class_checkpoint), "model.head_init_scale": 0.001,
                              "train.epochs": 1})
    check_before_start(cfg)  # a new head is no mismatch
    with caplog.at_level(logging.INFO):
        worker, session = _worker(cfg)
    source = read_weights(five_class_checkpoint).model
    module = worker.trainer.module
    for name, value in module.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, source[name]), name
    assert module.head.weight.shape == (3, 32) and module.head.weight.abs().max() < 0.01  # fresh, scaled 0.001
    assert torch.equal(worker.trainer.ema.module.stem[0].weight, module.stem[0].weight)  # EMA restarts there
    text = caplog.text
    assert "re-initialised 2 (the checkpoint's head has 5 classes, the model 3): head.weight, head.bias" in text
    assert "ignored 2 tensor(s) of the checkpoint: head.weight, head.bias" in text
    assert "not used from the file:" in text and "optimizer" in text and "sparse pattern" in text
    worker.run()
    assert session.reports[-1]["epochs_done"] == 1 and worker.trainer.step == 3  # a fresh schedule


def test_another_resolution_loads_every_tensor(tmp_path: Path, folder: Path, caplog) -> None:
    ckpt = our_checkpoint(tmp_path / "at32", tiny_cfg(folder))
    cfg = tiny_cfg(folder, **{"finetune.checkpoint": str(ckpt), "data.image_size": 64, "train.epochs": 1})
    with caplog.at_level(logging.INFO):
        worker, _ = _worker(cfg)
    assert "re-initialised" not in caplog.text
    assert torch.equal(worker.trainer.module.head.weight, read_weights(ckpt).model["head.weight"])
    x, _ = next(iter(worker.train_loader))
    assert x.shape[-1] == 64


def test_masks_keep_reinit_and_dense(tmp_path: Path, folder: Path, five_class_checkpoint: Path) -> None:
    saved = read_weights(five_class_checkpoint).masks
    common = {"finetune.checkpoint": str(five_class_checkpoint), "sparse.enabled": True, "train.epochs": 1}
    kept, _ = _worker(tiny_cfg(folder, **common))
    masks = kept.trainer.engine.masks
    assert saved and all(torch.equal(masks[n].cpu(), saved[n]) for n in saved if n in masks)
    assert "head.weight" not in masks  # the new head has no trained pattern: it starts dense

    redrawn, _ = _worker(tiny_cfg(folder, **common, **{"finetune.masks": "reinit", "sparse.init": "uniform",
                                                       "sparse.sparsity": 0.7}))
    assert redrawn.trainer.engine.density() == pytest.approx(0.3, abs=0.02)

    dense, _ = _worker(tiny_cfg(folder, **{**common, "sparse.enabled": False}))
    assert dense.trainer.engine is None


def test_official_sparse_file_keeps_the_zeros_as_its_pattern(tmp_path: Path, folder: Path) -> None:
    torch.manual_seed(0)
    net = create_model("slak_test", num_classes=3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim in (2, 4):
                p.mul_(torch.rand_like(p) > 0.4)
    path = official_checkpoint(tmp_path / "sparse.pth", net)
    cfg = tiny_cfg(folder, **{"finetune.checkpoint": str(path), "sparse.enabled": True, "train.epochs": 1})
    worker, _ = _worker(cfg)
    for name, mask in worker.trainer.engine.masks.items():
        assert torch.equal(mask.cpu(), dict(net.named_parameters())[name] != 0), name
    assert worker.trainer.engine.density() == pytest.approx(0.6, abs=0.03)


def test_dense_checkpoint_with_masks_keep_is_refused_with_the_fix(tmp_path: Path, folder: Path) -> None:
    path = official_checkpoint(tmp_path / "dense.pth", create_model("slak_test", num_classes=3))
    cfg = tiny_cfg(folder, **{"finetune.checkpoint": str(path), "sparse.enabled": True})
    with pytest.raises(PreflightError, match="no sparse pattern to keep.*finetune.masks=reinit"):
        check_before_start(cfg)


def test_wrong_architecture_and_missing_ema_are_refused_before_ray(tmp_path: Path, folder: Path) -> None:
    path = official_checkpoint(tmp_path / "t.pth", create_model("slak_test", num_classes=3))
    wrong = tiny_cfg(folder, **{"finetune.checkpoint": str(path), "model.short_edge": 5, "model.small_kernel": 5})
    with pytest.raises(PreflightError, match="(?s)does not fit the configured model slak_test.*wrong kernel sizes"):
        check_before_start(wrong)
    no_ema = tiny_cfg(folder, **{"finetune.checkpoint": str(path), "finetune.weights": "ema"})
    with pytest.raises(PreflightError, match="holds no EMA weights"):
        check_before_start(no_ema)
    missing = tiny_cfg(folder, **{"finetune.checkpoint": str(tmp_path / "nope.pth")})
    with pytest.raises(PreflightError, match="no such file"):
        check_before_start(missing)


@pytest.mark.parametrize(("name", "group"), [
    ("stem.0.weight", 0), ("stages.0.blocks.2.mlp.fc1.weight", 1), ("stages.1.downsample.1.weight", 2),
    ("stages.1.blocks.0.gamma", 2), ("stages.2.downsample.0.bias", 3), ("stages.2.blocks.0.norm.weight", 3),
    ("stages.2.blocks.5.large_kernel.tall.conv.weight", 4), ("stages.2.blocks.26.mlp.fc2.bias", 11),
    ("stages.3.downsample.1.weight", 12), ("stages.3.blocks.2.gamma", 12), ("norm.weight", 13), ("head.bias", 13),
])
def test_layer_ids_follow_convnext_on_slak_base(name: str, group: int) -> None:
    assert lr_layer_id(name, (3, 3, 27, 3)) == group


def test_tiny_spreads_its_nine_stage2_blocks_over_the_nine_groups() -> None:
    assert [lr_layer_id(f"stages.2.blocks.{b}.gamma", (3, 3, 9, 3)) for b in range(9)] == list(range(3, 12))


def test_layer_decay_groups_get_their_learning_rates(folder: Path) -> None:
    cfg = tiny_cfg(folder, **{"train.layer_decay": 0.5, "train.lr": 1e-3, "train.epochs": 1})
    trainer = Trainer(cfg, steps_per_epoch=3, num_classes=3)
    trainer._optimizer_step(iter([(torch.randn(6, 3, 32, 32), torch.arange(6) % 3)]))
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    lr = trainer.lr_values[0]
    for group in trainer.optimizer.param_groups:
        expected = lr * 0.5 ** (LR_LAYERS - 1 - group["layer"])
        assert group["lr"] == pytest.approx(expected)
        for p in group["params"]:
            assert lr_layer_id(names[id(p)], (1, 1, 2, 1)) == group["layer"]
            assert group["weight_decay"] == (0.0 if p.ndim <= 1 else cfg.train.weight_decay)
    assert len(param_groups(trainer.module, 0.05)) == 2  # without layer decay: the two usual groups


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"finetune.weights": "emma"}, "finetune.weights='emma': must be one of ['model', 'ema']; did you mean 'ema'?"),
    ({"finetune.masks": "dense"}, "finetune.masks='dense': must be one of ['keep', 'reinit']"),
    ({"train.layer_decay": 0}, "train.layer_decay=0.0: must lie in (0, 1]"),
    ({"train.layer_decay": 1.2}, "train.layer_decay=1.2: must lie in (0, 1]"),
    ({"model.head_init_scale": 0}, "model.head_init_scale=0.0: must lie in (0, inf]"),
    ({"finetune.checkpoint": ""}, "finetune.checkpoint='': give the checkpoint to start from"),
])
def test_bad_settings_give_one_clear_line_each(overrides: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        tiny_cfg(None, **overrides)
    assert len(err.value.problems) == 1 and needle in err.value.problems[0], err.value.problems


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"finetune.masks": "reinit"}, "finetune.masks='reinit' has no effect: finetune.checkpoint is not set"),
    ({"finetune.checkpoint": "x.pth", "finetune.masks": "reinit"}, "finetune.masks='reinit' has no effect: "
     "sparse.enabled=false"),
    ({"finetune.checkpoint": "x.pth", "sparse.enabled": True, "sparse.sparsity": 0.5},
     "sparse.sparsity=0.5 has no effect: finetune.masks=keep continues from the checkpoint's sparse pattern"),
])
def test_settings_without_effect_are_warned(overrides: dict, needle: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator.config"):
        tiny_cfg(None, **overrides)
    assert needle in caplog.text
