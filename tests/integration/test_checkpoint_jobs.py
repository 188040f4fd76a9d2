"""Starting from a checkpoint, end to end on Ray Train with MLflow: a tiny model's checkpoint is evaluated by
two data-parallel workers (through ``experiments/evaluate.py``), and so is a file in the paper's released
layout; the numbers equal a one-process evaluation, and each run carries the checkpoint's SHA-256. The same
checkpoint is then fine-tuned (``experiments/train.py``) to another class count at another resolution, and
the fine-tuned weights are evaluated in turn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
mlflow_tracking = pytest.importorskip("mlflow.tracking")

from orchestrator import evaluation  # noqa: E402
from orchestrator.collate.evaluations import evaluation_table  # noqa: E402
from orchestrator.tracking import runs_dataframe  # noqa: E402
from orchestrator.weights import read_weights  # noqa: E402
from slak_model import create_model  # noqa: E402
from tests.orchestrator.checkpoint_files import (  # noqa: E402
    image_tree,
    official_checkpoint,
    our_checkpoint,
    tiny_cfg,
)
from tests.orchestrator.sessions import CpuSession  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "itest-checkpoints"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", REPO_ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


def _common(root: Path) -> list[str]:
    return [f"run.storage_path={root / 'ray'}", f"tracking.experiment={EXPERIMENT}",
            f"tracking.offline_dir={root / 'offline'}", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]


def _one_process(cfg, path: Path) -> dict[str, float]:
    plan = evaluation.plan_evaluation(cfg, read_weights(path))
    return evaluation.run_evaluation_worker({"experiment": cfg, "checkpoint": str(path), "sha256": plan.sha256,
                                             "run_name": "reference"}, CpuSession())


def test_evaluate_our_and_the_official_layout_on_two_workers(ray_cluster, root: Path, capsys) -> None:
    folder = image_tree(root / "images", per_class=(6, 5))
    cfg = tiny_cfg(folder, **{"run.num_workers": 2})
    ours = our_checkpoint(root / "epoch_0001", cfg)
    torch_model = create_model("slak_test", num_classes=3)
    official = official_checkpoint(root / "SLaK_test.pth", torch_model, torch_model, input_size=32, epochs=300,
                                   kernel_size=[13, 11, 9, 7, 3], Decom=True)
    cli = _script("evaluate")
    for path in (ours, official):
        code = cli.main(["--checkpoint", str(path), "data.source=imagenet", f"data.path={folder}",
                         "run.num_workers=2", "run.use_gpu=false", "train.global_batch_size=6",
                         *_common(root)])
        out, err = capsys.readouterr()
        assert code == 0, err
        expected = _one_process(cfg, path)
        assert f"| val/top1 | {expected['val/top1']:.4g} |" in out
        assert f"| ema/top1 | {expected['ema/top1']:.4g} |" in out
    table = evaluation_table(runs_dataframe(f"sqlite:///{root / 'mlflow.db'}", EXPERIMENT))
    assert len(table) == 2 and set(table["status"]) == {"FINISHED"}
    assert set(table["sha256"]) == {read_weights(ours).sha256[:12], read_weights(official).sha256[:12]}
    assert set(table["checkpoint"]) == {"state.pt", "SLaK_test.pth"}


def test_finetune_to_a_new_class_count_and_resolution_then_evaluate(ray_cluster, root: Path, capsys) -> None:
    source = image_tree(root / "three", per_class=(6, 5))
    pretrained = our_checkpoint(root / "pretrained", tiny_cfg(source, **{"sparse.enabled": True,
                                                                         "sparse.init": "uniform"}))
    target = image_tree(root / "two", classes=("yes", "no"), per_class=(8, 4), size=(70, 66))
    name = "finetuned"
    code = _script("train").main([
        f"finetune.checkpoint={pretrained}", "data.source=imagenet", f"data.path={target}", "data.image_size=64",
        "data.auto_augment=''", "data.mixup=0", "data.cutmix=0", "data.reprob=0", "model.head_init_scale=0.001",
        "sparse.enabled=true", "train.epochs=2", "train.global_batch_size=8", "train.layer_decay=0.7",
        "train.lr=1e-3", "run.num_workers=2", "run.use_gpu=false", f"run.name={name}", *_common(root)])
    out, err = capsys.readouterr()
    assert code == 0, err
    client = mlflow_tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`slak.run_name` = '{name}'")
    assert run.data.tags["slak.finetune.sha256"] == read_weights(pretrained).sha256
    report = client.download_artifacts(run.info.run_id, "finetune/load_report.txt", str(root))
    text = Path(report).read_text()
    assert "re-initialised 2 (the checkpoint's head has 3 classes, the model 2): head.weight, head.bias" in text
    assert run.data.params["train.layer_decay"] == "0.7" and run.data.metrics["epochs_done"] == 2

    final = sorted((root / "ray" / name).glob("epoch_*"))[-1]
    code = _script("evaluate").main(["--checkpoint", str(final), "run.num_workers=2", *_common(root)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "| val/top1 |" in out and "| ema/top1 |" in out
