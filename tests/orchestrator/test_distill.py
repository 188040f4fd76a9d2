"""Distillation: the NKD and KD losses against hand-computed values and gradcheck, the frozen teacher, the
training loop's distillation mode, and the config's and preflight's refusals of bad distillation settings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from orchestrator import data, distill
from orchestrator.checkpoints import save_checkpoint_dir
from orchestrator.config.loading import load_config
from orchestrator.config.schema import DistillConfig
from orchestrator.config.validation import ConfigError
from orchestrator.loop import Trainer
from orchestrator.preflight import PreflightError, check_before_start

MICRO = 8
CLASSES = 4

# ---------------------------------------------------------------------- the losses by hand
# Two samples, three classes. Sample 0 has target 0, sample 1 target 2.
S = [[2.0, 1.0, 0.0], [0.5, -1.0, 1.5]]
T_ = [[3.0, 0.0, 1.0], [0.0, 2.0, 1.0]]
Y = [0, 2]


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def _nkd_by_hand(temp: float, gamma: float) -> float:
    total_target, total_non = 0.0, 0.0
    for s, t, y in zip(S, T_, Y, strict=True):
        p, q = _softmax(s), _softmax(t)
        total_target += -q[y] * math.log(p[y])
        s_non = [v for k, v in enumerate(s) if k != y]
        t_non = [v for k, v in enumerate(t) if k != y]
        ps, qt = _softmax(s_non, temp), _softmax(t_non, temp)
        total_non += -sum(a * math.log(b) for a, b in zip(qt, ps, strict=True))
    n = len(S)
    return total_target / n + gamma * temp**2 * total_non / n


def _kd_by_hand(temp: float) -> float:
    total = 0.0
    for s, t in zip(S, T_, strict=True):
        p, q = _softmax(s, temp), _softmax(t, temp)
        total += sum(b * math.log(b / a) for a, b in zip(p, q, strict=True))
    return temp**2 * total / len(S)


@pytest.mark.parametrize("temp,gamma", [(1.0, 1.0), (3.0, 1.5), (0.5, 0.0)], ids=["official", "T3-g1.5", "target"])
def test_nkd_matches_the_hand_computed_value(temp: float, gamma: float) -> None:
    got = distill.nkd_loss(torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64),
                           torch.tensor(Y), temp, gamma)
    assert got.item() == pytest.approx(_nkd_by_hand(temp, gamma), rel=1e-12)


def test_nkd_reads_the_target_class_of_a_mixup_target() -> None:
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.35, 0.6]], dtype=torch.float64)  # largest entries: 0 and 2
    s, t = torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64)
    assert distill.nkd_loss(s, t, soft, 2.0).item() == pytest.approx(_nkd_by_hand(2.0, 1.0), rel=1e-12)


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_kd_matches_the_hand_computed_value(temp: float) -> None:
    got = distill.kd_loss(torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64), temp)
    assert got.item() == pytest.approx(_kd_by_hand(temp), rel=1e-12)


def test_losses_vanish_or_bottom_out_where_the_student_is_the_teacher() -> None:
    t = torch.tensor(T_, dtype=torch.float64)
    assert distill.kd_loss(t.clone(), t, 3.0).item() == pytest.approx(0.0, abs=1e-14)
    # NKD's non-target part is a cross-entropy: at the teacher it equals the teacher's entropy, its minimum
    s = t.clone().requires_grad_(True)
    loss = distill.nkd_loss(s, t, torch.tensor(Y), 2.0, gamma=1.0) - distill.nkd_loss(s, t, torch.tensor(Y), 2.0, 0.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert grad.abs().max().item() < 1e-12


def test_loss_gradients_pass_gradcheck_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 3, 6, 2, 3])
    assert torch.autograd.gradcheck(lambda x: distill.nkd_loss(x, t, y, 3.0, 1.5), (s,))
    assert torch.autograd.gradcheck(lambda x: distill.kd_loss(x, t, 3.0), (s,))


def test_the_teacher_logits_get_no_gradient() -> None:
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T_, requires_grad=True)
    (distill.nkd_loss(s, t, torch.tensor(Y), 3.0) + distill.kd_loss(s, t, 3.0)).backward()
    assert t.grad is None and s.grad is not None


def test_distillation_loss_weights_default_to_the_official_recipe() -> None:
    ce = torch.nn.CrossEntropyLoss()
    s, t, y = torch.tensor(S, dtype=torch.float64), torch.tensor(T_, dtype=torch.float64), torch.tensor(Y)
    total, ce_part, _ = distill.DistillationLoss(DistillConfig(teacher="x", temperature=3.0), ce)(s, t, y)
    assert total.item() == pytest.approx(_nkd_by_hand(3.0, 1.0), rel=1e-6)  # NKD alone
    assert ce_part.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    total, ce_part, _ = distill.DistillationLoss(DistillConfig(teacher="x", loss="kd", temperature=3.0), ce)(
        s, t, y)
    assert total.item() == pytest.approx(0.9 * ce_part.item() + 0.1 * _kd_by_hand(3.0), rel=1e-6)
    total, *_ = distill.DistillationLoss(DistillConfig(teacher="x", ce_weight=1.0, gamma=1.5), ce)(s, t, y)
    assert total.item() == pytest.approx(F.cross_entropy(s, y).item() + _nkd_by_hand(1.0, 1.5), rel=1e-6)


# ---------------------------------------------------------------------- teachers and the loop
def _cfg(**extra):
    base = {"run.num_workers": 1, "train.global_batch_size": 16, "train.micro_batch_size": MICRO, "train.epochs": 1,
            "train.ema_decay": 0.9, "data.image_size": 32, "data.source": "shapes", "data.num_classes": CLASSES,
            "data.train_size": 64, "data.val_size": 32, "tracking.enabled": False}
    return load_config(None, {**base, **extra})


def _loader(cfg) -> DataLoader:
    bundle = data.build_datasets(cfg.data, seed=0)
    train, _ = data.build_loaders(bundle, cfg, rank=0, world_size=1, micro_batch_size=MICRO, seed=0)
    return train


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A slak_test teacher's checkpoint folder as a training run writes it (untrained weights do: the tests
    below need a fixed network, not a good one)."""
    cfg = _cfg(**{"sparse.enabled": False, "model.kernel_mode": "naive", "model.stage_kernels": [5, 5, 5, 3]})
    tr = Trainer(cfg, steps_per_epoch=1, num_classes=CLASSES)
    folder = tmp_path_factory.mktemp("teacher") / "epoch_0001"
    save_checkpoint_dir(tr.state_dict(), folder)
    return folder


def _student_cfg(teacher_dir: Path, **extra):
    return _cfg(**{"model.variant": "test_convnext", "sparse.enabled": False, "distill.teacher": "slak_test",
                   "distill.teacher_checkpoint": str(teacher_dir), **extra})


def test_the_teacher_is_frozen_outside_the_student_and_its_optimizer(teacher_dir: Path) -> None:
    cfg = _student_cfg(teacher_dir, **{"data.mixup": 0.0, "data.cutmix": 0.0})
    loader = _loader(cfg)
    tr = Trainer(cfg, steps_per_epoch=len(loader) // cfg.accumulation_steps, num_classes=CLASSES)
    teacher = tr.teacher
    assert teacher is not None and teacher.identity.source == "trainer" and len(teacher.identity.sha256) == 64
    params = list(teacher.model.parameters())
    assert not any(p.requires_grad for p in params) and not teacher.model.training
    before = [p.detach().clone() for p in params]
    student_ids = {id(p) for p in tr.module.parameters()}
    assert not student_ids & {id(p) for p in params}
    optimised = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert optimised == student_ids
    metrics = tr.train_one_epoch(loader)
    assert all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert not any(id(p) in tr.optimizer.state for p in params)
    assert {"train/loss_ce", "train/loss_kd"} <= set(metrics)
    assert metrics["train/loss"] == pytest.approx(metrics["train/loss_kd"], rel=1e-5)  # NKD alone
    state = tr.state_dict()
    assert state["teacher"]["sha256"] == teacher.identity.sha256
    assert not any(k.startswith("teacher") for k in state["model"])
    again = Trainer(cfg, steps_per_epoch=tr.steps_per_epoch, num_classes=CLASSES)
    again.load_state_dict(state)  # the epoch's loss parts continue with the run
    assert torch.equal(again._distill_sums, tr._distill_sums) and again._distill_sums.sum() > 0


def test_a_resume_with_another_teacher_file_is_refused(teacher_dir: Path, tmp_path: Path) -> None:
    cfg = _student_cfg(teacher_dir)
    tr = Trainer(cfg, steps_per_epoch=1, num_classes=CLASSES)
    state = tr.state_dict()
    state["teacher"] = {**state["teacher"], "sha256": "0" * 64}
    with pytest.raises(ValueError, match="SHA-256"):
        tr.load_state_dict(state)


def test_a_timm_student_trains_without_a_teacher() -> None:
    cfg = _cfg(**{"model.variant": "test_convnext", "sparse.enabled": False, "model.drop_path_rate": 0.1})
    loader = _loader(cfg)
    tr = Trainer(cfg, steps_per_epoch=len(loader) // cfg.accumulation_steps, num_classes=CLASSES)
    assert type(tr.module).__name__ == "ConvNeXt" and tr.teacher is None
    metrics = tr.train_one_epoch(loader)
    assert math.isfinite(metrics["train/loss"]) and "train/loss_kd" not in metrics


def test_an_official_slak_state_dict_loads_as_teacher(tmp_path: Path) -> None:
    import slak_model
    from slak_model.checkpoint import to_reference_state_dict

    model = slak_model.create_model("slak_test", num_classes=CLASSES)
    path = tmp_path / "official.pth"
    torch.save({"model": to_reference_state_dict(model)}, path)
    teacher = distill.load_teacher(DistillConfig(teacher="slak_test", teacher_checkpoint=str(path)), CLASSES)
    assert teacher.identity.source == "slak-official"
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(teacher(x), model(x))


# ---------------------------------------------------------------------- refusals before Ray
def test_a_relative_teacher_checkpoint_is_taken_from_the_current_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(**{"model.variant": "test_convnext", "sparse.enabled": False, "distill.teacher": "slak_test",
                  "distill.teacher_checkpoint": "runs/teacher/epoch_0002"})
    assert cfg.distill.teacher_checkpoint == str(tmp_path / "runs" / "teacher" / "epoch_0002")


def test_distill_settings_without_a_teacher_are_one_error() -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(**{"distill.loss": "kd", "distill.temperature": 3.0})
    assert len(err.value.problems) == 2
    assert all("distill.teacher is not set" in p for p in err.value.problems)


def test_a_teacher_without_checkpoint_and_bad_numbers_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(**{"distill.teacher": "slak_tny", "distill.temperature": 0, "distill.loss": "dkd",
                "model.variant": "test_convnext", "sparse.enabled": False})
    text = str(err.value)
    assert "did you mean 'slak_tiny'" in text and "needs distill.teacher_checkpoint" in text
    assert "distill.temperature=0" in text and "distill.loss='dkd'" in text


def test_slak_settings_and_sparsity_on_a_timm_student_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(**{"model.variant": "convnext_tiny", "model.stage_kernels": [7, 7, 7, 7]})
    text = str(err.value)
    assert "sparse.enabled=false" in text and "model.stage_kernels=[7, 7, 7, 7] has no effect" in text


def test_a_missing_teacher_checkpoint_fails_preflight(tmp_path: Path) -> None:
    cfg = _student_cfg(tmp_path / "nowhere.pth")
    with pytest.raises(PreflightError, match="no such file or folder"):
        check_before_start(cfg)


def test_a_teacher_checkpoint_of_another_variant_fails_preflight(teacher_dir: Path) -> None:
    cfg = _student_cfg(teacher_dir, **{"distill.teacher": "slak_tiny"})
    with pytest.raises(PreflightError) as err:
        check_before_start(cfg)
    assert "holds a 'slak_test'" in str(err.value) and "distill.teacher=slak_test" in str(err.value)


def test_a_teacher_of_another_class_count_fails_preflight(teacher_dir: Path) -> None:
    cfg = _student_cfg(teacher_dir, **{"data.num_classes": 10})
    with pytest.raises(PreflightError, match="predicts 4 classes"):
        check_before_start(cfg)


def test_an_official_checkpoint_of_another_variant_fails_preflight(tmp_path: Path) -> None:
    import slak_model
    from slak_model.checkpoint import to_reference_state_dict

    path = tmp_path / "small.pth"
    other = slak_model.create_model("slak_test", num_classes=CLASSES, kernel_mode="naive", stage_kernels=[5, 5, 5, 3])
    torch.save({"model": to_reference_state_dict(other)}, path)
    cfg = _student_cfg(path)
    with pytest.raises(PreflightError, match="does not fit distill.teacher='slak_test'"):
        check_before_start(cfg)


def test_an_unknown_timm_student_fails_preflight_with_the_nearest_names() -> None:
    cfg = _cfg(**{"model.variant": "convnext_tinny", "sparse.enabled": False})
    with pytest.raises(PreflightError, match="did you mean 'convnext_tiny'"):
        check_before_start(cfg)


# ---------------------------------------------------------------------- presets
CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


@pytest.mark.parametrize("name,student,teacher,batch,accumulation", [
    ("distill_slak_tiny_to_convnext_tiny", "convnext_tiny", "slak_tiny", 2048, 8),
    ("distill_slak_small_to_convnext_small", "convnext_small", "slak_small", 4096, 16),
])
def test_the_distillation_presets_are_the_official_recipe(name: str, student: str, teacher: str, batch: int,
                                                          accumulation: int) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert (cfg.model.variant, cfg.distill.teacher, cfg.sparse.enabled) == (student, teacher, False)
    d = cfg.distill
    assert (d.loss, d.temperature, d.gamma, d.weights(), d.teacher_ema) == ("nkd", 1.0, 1.0, (0.0, 1.0), False)
    t = cfg.train
    assert (t.epochs, t.global_batch_size, cfg.accumulation_steps, t.lr, t.warmup_epochs) == (300, batch,
                                                                                             accumulation, 4e-3, 20)
    assert (cfg.model.drop_path_rate, t.ema, t.ema_decay, t.precision) == (0.1, True, 0.9999, "fp32")
    assert (cfg.data.mixup, cfg.data.cutmix, cfg.data.smoothing, cfg.data.reprob) == (0.8, 1.0, 0.1, 0.25)


# ---------------------------------------------------------------------- collation
def test_students_are_collated_beside_the_published_l2s_numbers() -> None:
    import pandas as pd

    from orchestrator.collate.distillation import distillation_table, to_markdown

    def run(name: str, student: str, teacher: str | None, top1: float, source: str = "imagenet", epochs: int = 300):
        params = {"params.model.variant": student, "params.data.source": source, "params.train.epochs": str(epochs),
                  "params.data.image_size": "224", "params.distill.loss": "nkd", "params.distill.temperature": "1.0"}
        if teacher is not None:
            params["params.distill.teacher"] = teacher
        return {"run_id": name, "status": "FINISHED", "tags.slak.run_name": name, "metrics.val/top1": top1,
                "metrics.ema/top1": top1 - 0.1, "metrics.teacher/top1": 82.5 if teacher else float("nan"), **params}

    runs = pd.DataFrame([run("l2s-t", "convnext_tiny", "slak_tiny", 83.0), run("base-t", "convnext_tiny", None, 82.0),
                         run("proxy", "test_convnext", "slak_test", 40.0, source="shapes", epochs=2),
                         run("unrelated", "slak_tiny", None, 82.4)])
    table = distillation_table(runs)
    by = {(r.student, r.teacher, r.run): r for r in table.itertuples(index=False)}
    assert by[("ConvNeXt-T", "SLaK-T", "l2s-t")].published_top1 == 83.1
    assert by[("ConvNeXt-T", "SLaK-T", "l2s-t")].delta == pytest.approx(-0.1)
    assert by[("ConvNeXt-T", "none", "base-t")].published_top1 == 82.1
    proxy = by[("test_convnext", "slak_test", "proxy")]
    assert math.isnan(proxy.published_top1) and math.isnan(proxy.delta)
    missing = table[table["status"] == "missing"]
    assert {(r.student, r.teacher) for r in missing.itertuples()} == {("ConvNeXt-S", "none"), ("ConvNeXt-S", "SLaK-S")}
    assert "unrelated" not in set(table["run"])
    assert list(table["student"][:2]) == ["ConvNeXt-T", "ConvNeXt-T"]  # the published order first
    text = to_markdown(table)
    assert "| ConvNeXt-T | SLaK-T | l2s-t | FINISHED | nkd |" in text and "84.3" in text
