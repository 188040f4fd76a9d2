"""The distillation smoke job on Ray Train (2 CPU workers, gloo): a test_convnext student learns from a slak_test
teacher with NKD and ends closer to the teacher's predictions than it started; MLflow holds the teacher's identity
and the loss parts; bad teacher settings exit 2 before Ray starts."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
mlflow_tracking = pytest.importorskip("mlflow.tracking")

from job_helpers import load_train_cli

from orchestrator import checkpoints, data, ray_train
from orchestrator.checkpoints import save_checkpoint_dir
from orchestrator.config.loading import load_config
from orchestrator.loop import Trainer, build_model, seed_everything

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET = REPO_ROOT / "experiments" / "configs" / "smoke_distill.yaml"
EXPERIMENT = "itest-distill"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A slak_test teacher trained in this process for a few steps on the shapes (labels, no mixing): enough for
    predictions of its own, which the student can approach."""
    cfg = load_config(None, {
        "run.num_workers": 1, "sparse.enabled": False, "data.source": "shapes", "data.num_classes": 10,
        "data.train_size": 128, "data.val_size": 64, "data.mixup": 0.0, "data.cutmix": 0.0, "data.smoothing": 0.0,
        "train.epochs": 1, "train.global_batch_size": 16, "train.lr": 3e-3, "train.ema": False,
        "tracking.enabled": False})
    bundle = data.build_datasets(cfg.data, seed=1)
    loader, _ = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=16, seed=1)
    trainer = Trainer(cfg, steps_per_epoch=len(loader), num_classes=10)
    trainer.train_one_epoch(loader)
    trainer.end_epoch()
    folder = tmp_path_factory.mktemp("teacher") / "epoch_0001"
    save_checkpoint_dir(trainer.state_dict(), folder)
    return folder


def _student_cfg(root: Path, teacher: Path, **extra):
    return load_config(PRESET, {
        "run.name": "distilled", "run.storage_path": str(root / "ray"),
        "distill.teacher_checkpoint": str(teacher), "tracking.uri": f"sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment": EXPERIMENT, "tracking.offline_dir": str(root / "offline"), **extra})


def _kl_and_agreement(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    student.eval()
    teacher.eval()
    with torch.no_grad():
        s, t = student(x), teacher(x)
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True).item()
    return kl, (s.argmax(1) == t.argmax(1)).float().mean().item()


def test_the_student_moves_towards_the_teacher(ray_cluster, teacher_dir: Path, tmp_path: Path) -> None:
    from orchestrator import distill

    cfg = _student_cfg(tmp_path, teacher_dir)
    result = ray_train.run_training(cfg)
    m = result.metrics
    assert m["epochs_done"] == 2
    for key in ("train/loss_ce", "train/loss_kd", "teacher/top1", "val/top1", "ema/top1"):
        assert key in m, key
    assert m["train/loss"] == pytest.approx(m["train/loss_kd"], rel=1e-4)  # NKD alone, as the official runs

    # the student's predictions on a fixed batch: closer to the teacher's after training than at its start
    bundle = data.build_datasets(cfg.data, seed=cfg.train.seed)
    x = torch.stack([bundle.val[i][0] for i in range(64)])
    teacher = distill.load_teacher(cfg.distill, 10).model
    seed_everything(cfg.train.seed)  # the trainer's initial weights
    start = build_model(cfg, 10)
    with result.checkpoint.as_directory() as d:
        state, _ = checkpoints.load_checkpoint_dir(d)
    end = build_model(cfg, 10)
    end.load_state_dict(state["model"])
    kl_start, agree_start = _kl_and_agreement(start, teacher, x)
    kl_end, agree_end = _kl_and_agreement(end, teacher, x)
    assert kl_end < 0.8 * kl_start, (kl_start, kl_end)
    assert agree_end > agree_start, (agree_start, agree_end)
    assert not any(k.startswith("teacher") for k in state["model"])  # the teacher is not in the student's state

    # MLflow: the teacher's identity as tags and params, the loss parts as metrics
    client = mlflow_tracking.MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`slak.run_name` = 'distilled'")
    sha = hashlib.sha256((teacher_dir / "state.pt").read_bytes()).hexdigest()
    assert run.data.tags["slak.teacher.sha256"] == sha and run.data.tags["slak.teacher.source"] == "trainer"
    assert run.data.params["distill.teacher"] == "slak_test" and run.data.params["model.variant"] == "test_convnext"
    assert len(client.get_metric_history(run.info.run_id, "train/loss_kd")) == 2
    assert len(client.get_metric_history(run.info.run_id, "teacher/top1")) == 1


@pytest.mark.parametrize("overrides,expected", [
    ({"distill.teacher_checkpoint": "{root}/nowhere.pth"}, "no such file or folder"),
    ({"distill.teacher": "slak_tiny"}, "holds a 'slak_test'"),
    ({"distill.teacher": "null", "distill.teacher_checkpoint": "null", "distill.temperature": 3},
     "distill.teacher is not set"),
], ids=["missing-checkpoint", "other-variant", "no-teacher"])
def test_bad_teacher_settings_exit_2_before_ray(teacher_dir: Path, tmp_path: Path, capsys, overrides: dict,
                                                 expected: str) -> None:
    args = ["--config", str(PRESET), f"run.storage_path={tmp_path / 'ray'}", "tracking.enabled=false",
            f"distill.teacher_checkpoint={teacher_dir}"]
    args += [f"{k}={str(v).format(root=tmp_path)}" for k, v in overrides.items()]
    t0 = time.monotonic()
    code = load_train_cli().main(args)
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 60, err
    assert err.count("error:") == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "ray").exists(), "nothing may be written for a job that cannot start"
