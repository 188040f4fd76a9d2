"""Small files for the checkpoint tests: an image folder, our own checkpoint folder, and a file in the paper's
released layout (reference names behind ``module.``, ``model``/``model_ema`` keys, pickled ``args``)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orchestrator.checkpoints import save_checkpoint_dir
from orchestrator.config.loading import load_config
from orchestrator.config.schema import ExperimentConfig
from orchestrator.loop import Trainer
from slak_model.checkpoint import to_reference_state_dict

CLASSES = ("ant", "bee", "cow")


def image_tree(root: Path, classes=CLASSES, per_class=(6, 3), size=(40, 36)) -> Path:
    """``root/{train,val}/<class>/*.png``: each class a different dominant colour plus noise, so a model
    can learn it in a few steps and its predictions are not all one class."""
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c_index, c in enumerate(classes):
            for i in range(n):
                rng = np.random.default_rng(hash((split, c, i)) % 2**32)
                pixels = rng.integers(0, 90, (size[1], size[0], 3))
                pixels[..., c_index % 3] += 160
                path = root / split / c / f"{c}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return root


def tiny_cfg(root: Path | None = None, **overrides) -> ExperimentConfig:
    """slak_test on ``root`` (an image folder) or on shapes, one CPU worker, tracking off."""
    base = {"model.variant": "slak_test", "data.image_size": 32, "train.global_batch_size": 6,
            "run.num_workers": 1, "run.use_gpu": False, "tracking.enabled": False, "sparse.enabled": False,
            "train.ema_decay": 0.5, "data.mixup": 0.0, "data.cutmix": 0.0, "data.reprob": 0.0,
            "data.auto_augment": ""}
    if root is not None:
        base.update({"data.source": "imagenet", "data.path": str(root)})
    else:
        base.update({"data.train_size": 24, "data.val_size": 12, "data.num_classes": 3})
    return load_config(None, {**base, **overrides})


def our_checkpoint(folder: Path, cfg: ExperimentConfig, num_classes: int = 3, seed: int = 0) -> Path:
    """A checkpoint folder as a training job writes it (manifest + ``state.pt``), from a fresh trainer whose
    EMA weights differ from its model's (so the two evaluations differ)."""
    trainer = Trainer(cfg, steps_per_epoch=1, num_classes=num_classes)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in trainer.module.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if trainer.ema is not None:
            for p in trainer.ema.module.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    if trainer.engine is not None:
        trainer.initialize_sparsity((torch.randn(4, 3, 32, 32), torch.arange(4) % num_classes))
    state = trainer.state_dict()
    state["metrics"] = {}
    save_checkpoint_dir(state, folder, extra={"name": "epoch_0001", "run": "test"})
    return folder


def official_checkpoint(path: Path, net: torch.nn.Module, ema_net: torch.nn.Module | None = None, **args) -> Path:
    """``net`` (and ``ema_net``) saved as the reference's ``main.py`` saves them: reference parameter names,
    the DDP ``module.`` prefix, ``model``/``model_ema`` keys and the training arguments as a Namespace."""
    checkpoint = {"model": {f"module.{k}": v for k, v in to_reference_state_dict(net).items()},
                  "epoch": 299, "optimizer": {"state": {}}, "args": argparse.Namespace(**args)}
    if ema_net is not None:
        checkpoint["model_ema"] = to_reference_state_dict(ema_net)
    torch.save(checkpoint, path)
    return path
