"""Knowledge distillation: the frozen teacher and the student's losses (NKD and Hinton's KD).

This is the large-to-small kernel distillation of "Are Large Kernels Better Teachers than Transformers
for ConvNets?" (Huang et al., ICML 2023; the SLaK repository's ``main_KD.py``): a trained SLaK teacher,
a ConvNeXt student, and the NKD loss of Yang et al. ("Rethinking Knowledge Distillation via
Cross-Entropy", 2022). What the official code does, and so what this module does by default:

* the teacher sees the very batch the student sees, after Mixup/CutMix, in eval mode (BatchNorm uses its
  running statistics), under the same autocast; its weights are the checkpoint's model weights (not its
  EMA), and nothing of it is optimised;
* NKD, for student logits ``s``, teacher logits ``t`` and the target class ``y`` (the largest entry of a
  Mixup target)::

      L_target     = -mean_n( softmax(t)_y * log softmax(s)_y )          (teacher's confidence, no gradient)
      L_non_target = -gamma * T^2 * mean_n( sum_{k != y} q_k * log p_k )  q, p: softmax over the non-target
                                                                         logits of t / T and s / T
      NKD          = L_target + L_non_target

  The official large-to-small runs use NKD alone (no separate label cross-entropy: ``L_target`` is one),
  with ``gamma = 1`` and ``T = 1``: the ``--T 3.0`` of the README's commands reaches only the KD loss
  (``engine_kd.py`` builds its NKD loss with its defaults). NKD's own code adds the student's usual
  cross-entropy and uses ``gamma = 1.5``: ``distill.ce_weight=1 distill.gamma=1.5``.
* KD: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` (batch mean), weighted ``alpha = 0.1`` against
  ``0.9`` times the label cross-entropy.

The teacher is held outside the student's module tree (:class:`Teacher` is no ``nn.Module`` attribute of
it), so DDP, the optimizer, the EMA, SyncBatchNorm conversion and the trainer's checkpoints never see it;
a resumed run reloads it from its checkpoint and checks the file's SHA-256.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator import networks
from orchestrator.checkpoints import file_sha256
from orchestrator.config.schema import DistillConfig, ModelConfig
from orchestrator.config.validation import is_slak_variant

__all__ = [
    "DistillationLoss",
    "Teacher",
    "TeacherError",
    "TeacherIdentity",
    "hard_labels",
    "kd_loss",
    "load_teacher",
    "nkd_loss",
    "teacher_problems",
]

log = logging.getLogger(__name__)

#: The ``format`` of this project's trainer checkpoints (``orchestrator.loop``).
_TRAINER_FORMAT = "slak-orchestrator-trainer"


class TeacherError(ValueError):
    """The teacher cannot be built from its checkpoint; the message names the setting and the fix."""


# ---------------------------------------------------------------------- losses
def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices ``(N,)``: ``target`` itself, or the largest entry of each row of a soft (Mixup) target."""
    return target.argmax(dim=1) if target.dim() > 1 else target


def _non_target(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``logits`` without the column of each row's target class: ``(N, C - 1)``."""
    keep = torch.ones_like(logits, dtype=torch.bool).scatter_(1, label.view(-1, 1), False)
    return logits[keep].view(logits.shape[0], logits.shape[1] - 1)


def nkd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
             gamma: float = 1.0) -> torch.Tensor:
    """Normalized KD of ``student`` towards ``teacher`` logits (``(N, C)``), as the module docstring writes it.

    Args:
        target: class indices ``(N,)`` or a soft target ``(N, C)`` (its largest entry is the target class).
        temperature: ``T`` of the non-target distributions (the target term is at temperature 1).
        gamma: weight of the non-target term (before the ``T^2`` that keeps its gradient's scale).
    """
    label = hard_labels(target).view(-1, 1)
    teacher = teacher.detach()
    log_p = F.log_softmax(student, dim=1).gather(1, label).squeeze(1)
    weight = F.softmax(teacher, dim=1).gather(1, label).squeeze(1)
    target_term = -(weight * log_p).mean()
    q = F.softmax(_non_target(teacher, label) / temperature, dim=1)
    log_p_non = F.log_softmax(_non_target(student, label) / temperature, dim=1)
    non_target_term = -(q * log_p_non).sum(dim=1).mean()
    return target_term + gamma * temperature**2 * non_target_term


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's KD: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, summed over classes, batch mean."""
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher.detach() / temperature, dim=1)
    return temperature**2 * F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)


class DistillationLoss:
    """``ce_weight * CE(student, target) + kd_weight * D(student, teacher)``, with its two parts for logging.

    Args:
        cfg: The ``distill`` section (loss, temperature, gamma, weights).
        criterion: The job's label loss (soft-target CE under Mixup, label smoothing otherwise).
    """

    def __init__(self, cfg: DistillConfig, criterion: nn.Module) -> None:
        self.cfg, self.criterion = cfg, criterion
        self.ce_weight, self.kd_weight = cfg.weights()

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, ce, kd)``; ``ce`` and ``kd`` unweighted. Logits are compared in float32 also under
        autocast (softmax of low-precision logits loses the small probabilities NKD's non-target term uses)."""
        s, t = student.float(), teacher.float()
        c = self.cfg
        if c.loss == "nkd":
            kd = nkd_loss(s, t, target, c.temperature, c.gamma)
        else:
            kd = kd_loss(s, t, c.temperature)
        if self.ce_weight > 0:
            ce = self.criterion(s, target)
            total = self.ce_weight * ce + self.kd_weight * kd
        else:  # logged, not trained on
            with torch.no_grad():
                ce = self.criterion(s, target)
            total = self.kd_weight * kd
        return total, ce.detach(), kd.detach()


# ---------------------------------------------------------------------- the teacher
@dataclass(frozen=True)
class TeacherIdentity:
    """What a run records about its teacher: the network, the weights file and which weights of it."""

    variant: str
    checkpoint: str
    sha256: str
    source: str  # "slak-official", "trainer", "timm"
    weights: str  # "model" or "ema"

    def tags(self) -> dict[str, str]:
        """MLflow tags ``slak.teacher.*``."""
        return {f"slak.teacher.{k}": v for k, v in (("variant", self.variant), ("checkpoint", self.checkpoint),
                                                     ("sha256", self.sha256), ("source", self.source),
                                                     ("weights", self.weights))}


class Teacher:
    """A frozen network that gives logits: eval mode, no gradients, no optimizer state, outside DDP.

    Calling it runs the forward under ``torch.no_grad`` in eval mode, whatever the caller's mode; it is
    not an ``nn.Module``, so assigning it to a module never registers it as a submodule.
    """

    def __init__(self, model: nn.Module, identity: TeacherIdentity) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model, self.identity = model, identity

    def to(self, *args: Any, **kwargs: Any) -> Teacher:
        self.model.to(*args, **kwargs)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.model.training:
            self.model.eval()
        return self.model(x)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _state_file(checkpoint: str) -> tuple[Path, Any]:
    """The weights file of ``checkpoint`` and, for a checkpoint folder, its state already read: the file
    itself (state None, read by the caller), or a folder's ``state.pt`` read once and checked against its
    manifest."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        from orchestrator.checkpoints import MANIFEST, STATE_FILE, load_checkpoint_dir

        if not (path / MANIFEST).is_file():
            raise TeacherError(f"distill.teacher_checkpoint={checkpoint!r} is a folder without {MANIFEST}: give a "
                               "checkpoint folder of a training run, or the weights file itself")
        try:
            state, _manifest = load_checkpoint_dir(path)  # verifies the file against its manifest
        except ValueError as err:
            raise TeacherError(f"distill.teacher_checkpoint={checkpoint!r}: {err}") from None
        return path / STATE_FILE, state
    if not path.is_file():
        raise TeacherError(f"distill.teacher_checkpoint={checkpoint!r}: no such file or folder; point it at the "
                           "teacher's weights (an official SLaK .pth, a run's checkpoint folder, a timm file)")
    return path, None


def _read(path: Path) -> Any:
    """A checkpoint file read without unpickling code (``weights_only``); safetensors through timm."""
    if path.suffix == ".safetensors":
        import timm

        return timm.models.load_state_dict(str(path))
    from slak_model.checkpoint import read_checkpoint

    return read_checkpoint(path)


def _trainer_teacher(cfg: DistillConfig, state: dict[str, Any], num_classes: int) -> nn.Module:
    """A teacher from one of our trainer checkpoints: its own ``model.*`` settings rebuild the network."""
    flat = state.get("config") or {}
    variant = flat.get("model.variant")
    if variant != cfg.teacher:
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r} holds a {variant!r} (its run's "
                           f"model.variant), not distill.teacher={cfg.teacher!r}; set distill.teacher={variant} or "
                           "point at a checkpoint of the teacher you mean")
    fields = {name.split(".", 1)[1]: value for name, value in flat.items()
              if name.startswith("model.") and name.split(".", 1)[1] in ModelConfig.__dataclass_fields__}
    fields["stage_kernels"] = list(fields["stage_kernels"]) if fields.get("stage_kernels") else None
    classes = fields.get("num_classes") or flat.get("data.num_classes") or num_classes
    if classes != num_classes:
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r} predicts {classes} classes (its "
                           f"run's), the student {num_classes}; distil on the teacher's dataset")
    model = networks.build_network(ModelConfig(**fields), classes)
    key = "ema" if cfg.teacher_ema else "model"
    weights = state.get(key)
    if weights is None:
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r} has no {key!r} weights (its run "
                           f"had train.ema=false); set distill.teacher_ema={'false' if cfg.teacher_ema else 'true'}")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r} does not fit its own run's "
                           f"model: {_first_line(err)}") from None
    return model


def _slak_teacher(cfg: DistillConfig, state: Any, num_classes: int) -> nn.Module:
    """A SLaK variant with its own geometry, loaded from an official (or our names') state dict strictly."""
    import slak_model
    from slak_model.checkpoint import CheckpointMismatchError, load_official_checkpoint

    model = slak_model.create_model(cfg.teacher, num_classes=num_classes)
    key = "model_ema" if cfg.teacher_ema else None
    try:
        load_official_checkpoint(model, state, key=key)
    except CheckpointMismatchError as err:
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r} does not fit "
                           f"distill.teacher={cfg.teacher!r} with {num_classes} classes:\n{err}") from None
    except ValueError as err:  # the requested entry is missing
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r}: {_first_line(err)}; "
                           "set distill.teacher_ema=false to take its model weights") from None
    return model


def _timm_teacher(cfg: DistillConfig, path: Path, num_classes: int) -> nn.Module:
    import timm

    model = networks.build_network(ModelConfig(variant=cfg.teacher), num_classes)
    try:  # timm's reader: torch files and safetensors, EMA weights on request, "module." stripped
        state = timm.models.load_state_dict(str(path), use_ema=cfg.teacher_ema)
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r} does not fit timm model "
                           f"distill.teacher={cfg.teacher!r} with {num_classes} classes: {_first_line(err)}") from None
    return model


def load_teacher(cfg: DistillConfig, num_classes: int, device: torch.device | str = "cpu") -> Teacher:
    """The frozen teacher of ``cfg`` with ``num_classes`` outputs (the student's), on ``device``.

    Raises:
        TeacherError: a missing or unreadable checkpoint, one of another network, or another class count.
    """
    if not cfg.enabled or not cfg.teacher_checkpoint:
        raise TeacherError("distill.teacher and distill.teacher_checkpoint must both be set to load a teacher")
    if not is_slak_variant(cfg.teacher):
        problem = networks.timm_model_problem(cfg.teacher)
        if problem is not None:
            raise TeacherError(f"distill.teacher={problem}")
    path, state = _state_file(cfg.teacher_checkpoint)
    try:
        state = _read(path) if state is None else state
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise TeacherError(f"distill.teacher_checkpoint={cfg.teacher_checkpoint!r} cannot be read: "
                           f"{_first_line(err)}") from None
    if isinstance(state, dict) and state.get("format") == _TRAINER_FORMAT:
        model, source = _trainer_teacher(cfg, state, num_classes), "trainer"
    elif is_slak_variant(cfg.teacher):
        model, source = _slak_teacher(cfg, state, num_classes), "slak-official"
    else:
        model, source = _timm_teacher(cfg, path, num_classes), "timm"
    identity = TeacherIdentity(variant=cfg.teacher, checkpoint=os.fspath(cfg.teacher_checkpoint),
                               sha256=file_sha256(path), source=source, weights="ema" if cfg.teacher_ema else "model")
    log.info("teacher %s from %s (%s, %s weights, sha256 %s)", identity.variant, identity.checkpoint, source,
             identity.weights, identity.sha256[:12])
    return Teacher(model, identity).to(device)


def teacher_problems(cfg: DistillConfig, num_classes: int) -> list[str]:
    """Why the teacher of ``cfg`` cannot be loaded (one line each), or nothing; loads it on the CPU."""
    if not cfg.enabled:
        return []
    try:
        load_teacher(cfg, num_classes)
    except TeacherError as err:
        return [str(err)]
    return []
