"""The training loop of one worker: the paper's recipe in plain PyTorch (no Ray), testable on its own.

Why a class over free functions: a resumed run must continue *bitwise* where it stopped, so everything
that evolves (model, EMA, optimizer moments, GradScaler, schedule position, sparsity masks and their
RNG, the per-rank RNG streams, the running epoch sums) lives in one object with one
:meth:`Trainer.state_dict`. ``ray_train.py`` wraps it with DDP, data sharding, reporting and
checkpoint files; a user can also drive it from their own script.

Recipe (spec section 4): AdamW without weight decay on 1-D params and biases; per-optimizer-step
cosine schedule with linear warm-up (``lr[0] = 0``); gradient accumulation derived from the global
batch, the micro batch and the worker count (DDP ``no_sync`` on all but the last micro-batch); the
sparsity engine is stepped after *every* optimizer step in every precision mode (the reference
forgot it under AMP); a mask-aware EMA is updated after each step; top-1/top-5 for model and EMA,
optionally after recomputing the EMA's BatchNorm statistics on training batches. With ``distill.teacher``
set, a frozen teacher (``orchestrator.distill``) gives logits on each micro-batch the student sees and the
loss is the distillation loss.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# isort: off
import slak_model  # noqa: F401 - installs the torchvision guard before the first timm import
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
# isort: on

from orchestrator import distill, networks
from orchestrator.config.schema import ExperimentConfig
from slak_model.checkpoint import LoadReport, load_pretrained
from slak_model.sparsity import DynamicSparsity, MaskedModelEma, TorchDistributedCollective
from slak_model.sparsity.masks import select_targets

__all__ = [
    "StepMetrics",
    "Trainer",
    "build_meta_model",
    "build_model",
    "cosine_schedule",
    "evaluate_model",
    "lr_layer_id",
    "param_groups",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]

log = logging.getLogger(__name__)
_STATE_FORMAT = "slak-orchestrator-trainer"
_STATE_VERSION = 2  # 2: RNG states as tensors and plain data only (loads with weights_only=True)


class StepMetrics(Mapping[str, float]):
    """One optimizer step's metrics (``train/loss``, ``train/lr``, ``step``).

    The loss stays on the device until it is read: a loop that logs every N steps then waits for the GPU
    every N steps, not after every step, so the host queues the next step's work while this one runs.
    Reading a non-finite loss raises (the epoch's sum is checked too, so a divergence never goes unseen).
    """

    _KEYS = ("train/loss", "train/lr", "step")

    def __init__(self, loss: torch.Tensor, lr: float, step: int) -> None:
        self._loss, self._value, self.lr, self.step = loss, None, lr, step

    def __getitem__(self, key: str) -> float:
        if key == "train/loss":
            if self._value is None:
                self._value = float(self._loss)
                if not math.isfinite(self._value):
                    raise FloatingPointError(
                        f"train/loss is {self._value} at optimizer step {self.step} (lr {self.lr:g}); lower "
                        "train.lr, set train.clip_grad, or use train.precision=fp32")
            return self._value
        if key == "train/lr":
            return self.lr
        if key == "step":
            return float(self.step)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


# ---------------------------------------------------------------------- building blocks
def build_model(cfg: ExperimentConfig, num_classes: int | None = None) -> nn.Module:
    """The configured SLaK variant or timm model (:func:`orchestrator.networks.build_network`);
    ``num_classes`` (from the data) unless ``model.num_classes`` is set."""
    m = cfg.model
    return networks.build_network(m, m.num_classes or num_classes or cfg.data.num_classes)


def build_meta_model(cfg: ExperimentConfig) -> nn.Module:
    """The configured model on the ``meta`` device: runs the model's own architecture checks (e.g. a short
    edge longer than a stage kernel) and gives its params/FLOPs, without allocating weights."""
    with torch.device("meta"):
        return build_model(cfg)


#: Depth groups of the layer-wise learning-rate decay: stem 0, stage 0 1, stage 1 2, stage 2 3..11, stage 3
#: 12, the final norm and the head 13 (ConvNeXt's fine-tuning rule, which the reference repository keeps).
LR_LAYERS = 14


def lr_layer_id(name: str, depths: tuple[int, ...] | list[int]) -> int:
    """The depth group (0 .. ``LR_LAYERS - 1``) of parameter ``name`` of a SLaK model of stage ``depths``.

    Stage 2's blocks are spread evenly over groups 3..11: ``3 + block * 9 // depth``, which is the
    reference's ``3 + block // 3`` for its 27-block S/B and puts T's 9 blocks one per group (the reference's
    rule, written for 27 blocks, leaves T in groups 3..5 and 6..11 empty).
    """
    parts = name.split(".")
    if parts[0] == "stem":
        return 0
    if parts[0] != "stages":
        return LR_LAYERS - 1
    stage = int(parts[1])
    if stage < 2:
        return stage + 1
    if stage == 3:
        return 12
    if parts[2] == "downsample":
        return 3
    return 3 + int(parts[3]) * 9 // max(1, depths[2])


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: decay for 2-D/4-D weights, none for 1-D params and biases (spec 4.4).

    With ``layer_decay`` < 1 each of those is split by depth group (:func:`lr_layer_id`) and carries
    ``lr_scale = layer_decay ** (LR_LAYERS - 1 - group)``, which the loop multiplies into every step's rate.
    """
    if layer_decay == 1.0:
        return param_groups_weight_decay(model, weight_decay=weight_decay)
    depths = tuple(model.cfg.depths)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias")
        layer = lr_layer_id(name, depths)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (LR_LAYERS - 1 - layer), "layer": layer})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int, warmup_steps: int) -> np.ndarray:
    """Per-optimizer-step values, exactly the reference's ``cosine_scheduler``.

    Warm-up is ``linspace(0, base, warmup_steps)`` (both ends, so step 0 has lr 0 and the last warm-up
    step has ``base``), then ``final + (base - final) * (1 + cos(pi * i / n)) / 2``; length
    ``epochs * steps_per_epoch``.
    """
    total = epochs * steps_per_epoch
    warmup_steps = min(max(0, warmup_steps), total)
    warm = np.linspace(0.0, base, warmup_steps) if warmup_steps > 0 else np.zeros(0)
    n = total - warmup_steps
    iters = np.arange(n)
    body = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(n, 1)))
    out = np.concatenate([warm, body])
    assert len(out) == total
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG stream this process draws from (augmentation, mixup, drop path).

    Only tensors and plain Python values, so that a checkpoint holding it loads with
    ``torch.load(weights_only=True)``: NumPy's state array travels as an int64 tensor.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, tuple):  # a version-1 checkpoint: NumPy's own state tuple
        np.random.set_state(n)
    else:
        np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of top-1 and top-5 hits (top-k capped at the class count)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(target.view(-1, 1))
    return hits[:, :1].sum(), hits.sum()


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable, *, device: torch.device,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   channels_last: bool = False) -> dict[str, float]:
    """Top-1/top-5 (%) and mean cross-entropy of ``model`` over ``loader``, summed over every rank.

    Each rank reads a disjoint shard (``orchestrator.data.ShardSampler``): the counts are summed, so the
    result is exactly that of one process reading the whole split, whatever the number of ranks.
    """
    rank_world = _world()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        top1, top5 = _accuracy(logits.float(), y)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        sums += torch.stack([loss.double(), top1.double(), top5.double(),
                             torch.tensor(float(y.shape[0]), dtype=torch.float64, device=device)])
    if rank_world[1] > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


# ---------------------------------------------------------------------- the trainer
def _average_bn_statistics(norms: list[nn.modules.batchnorm._BatchNorm]) -> None:
    """Make every rank's recalibrated BatchNorm statistics the average over all ranks' batches.

    With ``momentum=None`` each rank holds the mean of its per-batch means and variances; weighting by
    the batch counts gives exactly what one process would have computed over every rank's batches. Without
    this each rank would evaluate (and rank 0 would checkpoint) statistics of its own shard only.
    """
    for m in norms:
        count = m.num_batches_tracked.to(m.running_mean.dtype)
        packed = torch.cat([m.running_mean * count, m.running_var * count, count.reshape(1)])
        dist.all_reduce(packed)
        c = m.running_mean.numel()
        total = packed[-1].clamp_min(1)
        m.running_mean.copy_(packed[:c] / total)
        m.running_var.copy_(packed[c : 2 * c] / total)
        m.num_batches_tracked.fill_(int(packed[-1].item()))


class Trainer:
    """Model, optimizer, schedule, scaler, EMA and sparsity engine of one worker.

    Args:
        cfg: The validated experiment config.
        steps_per_epoch: Optimizer steps per epoch (micro-batches per worker // accumulation).
        num_classes: Classes of the dataset (unless ``model.num_classes`` fixes it).
        device: Where the model lives.
        wrap_model: Turns the module into its distributed form (``ray.train.torch.prepare_model`` or
            ``DistributedDataParallel``); None = single process. It must not move parameters off
            ``device``.
        mixup: timm ``Mixup`` (None = hard labels).
    """

    def __init__(self, cfg: ExperimentConfig, *, steps_per_epoch: int, num_classes: int,
                 device: torch.device | str = "cpu",
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None, mixup: Any = None) -> None:
        if steps_per_epoch < 1:
            raise ValueError(
                f"steps_per_epoch={steps_per_epoch}: the training set gives fewer micro-batches per worker than one "
                f"optimizer step needs ({cfg.accumulation_steps}); use more data (data.train_size) or a smaller "
                "train.global_batch_size")
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank, self.world_size = _world()
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.train.epochs * steps_per_epoch
        self.accumulation = cfg.accumulation_steps
        self.mixup = mixup
        t = cfg.train

        # Identical initial weights on every rank, then one RNG stream per rank (augmentation, drop path).
        seed_everything(t.seed)
        model = build_model(cfg, num_classes)
        self.ema = MaskedModelEma(model, decay=t.ema_decay) if t.ema else None
        if self.world_size > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN is GPU-only in torch
        model.to(self.device)
        if self.ema is not None:
            self.ema.module.to(self.device)
        if t.channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = model
        self.model = wrap_model(model) if wrap_model is not None else model
        self.forward_model = torch.compile(self.model) if t.compile else self.model
        seed_everything(t.seed + self.rank)

        # On CUDA the fused AdamW (one kernel for every parameter) saves 1 ms of an 86 ms SLaK-T step and
        # 9 ms of a 45 ms ConvNeXt-T step on an H100 (experiments/profile_step.py); CPU keeps foreach.
        self.optimizer = torch.optim.AdamW(param_groups(self.module, t.weight_decay, t.layer_decay), lr=t.lr,
                                           betas=tuple(t.opt_betas), eps=t.opt_eps,
                                           **({"fused": True} if self.device.type == "cuda" else {}))
        warmup = round(t.warmup_epochs * steps_per_epoch)
        self.lr_values = cosine_schedule(t.lr, t.min_lr, t.epochs, steps_per_epoch, warmup)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.train_loss_fn: nn.Module = (SoftTargetCrossEntropy() if mixup is not None
                                         else LabelSmoothingCrossEntropy(cfg.data.smoothing)
                                         if cfg.data.smoothing > 0 else nn.CrossEntropyLoss())
        self.teacher: distill.Teacher | None = None  # outside self.module: DDP and the optimizer never see it
        self.distill_loss: distill.DistillationLoss | None = None
        if cfg.distill.enabled:
            with torch.random.fork_rng(devices=[]):  # building it draws no number the student's streams use
                self.teacher = distill.load_teacher(cfg.distill, cfg.model.num_classes or num_classes, self.device)
            if t.channels_last:
                self.teacher.model.to(memory_format=torch.channels_last)
            self.distill_loss = distill.DistillationLoss(cfg.distill, self.train_loss_fn)
        self.engine: DynamicSparsity | None = None
        self.sparsity_ready = False
        if cfg.sparse.enabled:
            scfg = cfg.sparse.engine_config(seed=cfg.sparse_seed)
            collective = TorchDistributedCollective() if self.world_size > 1 else None
            self.engine = DynamicSparsity(self.module, scfg, total_steps=self.total_steps, collective=collective)
        self._start_masks: dict[str, torch.Tensor] | None = None  # a fine-tune's kept sparse pattern
        self.step = 0            # optimizer steps done
        self.epoch = 0           # epochs completed
        self.step_in_epoch = 0   # optimizer steps done in the current (unfinished) epoch
        self._sums = self._zero_sums()
        self._epoch_rng: dict[str, Any] | None = None  # RNG at the start of the current epoch

    # ------------------------------------------------------------------ helpers
    def _zero_sums(self) -> dict[str, float]:
        """Running sums of the current epoch on this rank; the loss sum lives on the device (float64) so
        that a step never waits for the GPU just to add its loss."""
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._distill_sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # CE, KD (distillation only)
        return {"micro": 0.0, "images": 0.0, "seconds": 0.0}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return float(self.lr_values[min(self.step, self.total_steps - 1)])

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.train.epochs

    def initialize_sparsity(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Draw the initial masks (SNIP scores one training batch with plain cross-entropy), or take the sparse
        pattern a fine-tune keeps (:meth:`start_from`)."""
        if self.engine is None:
            return
        if self._start_masks is not None:
            self.engine.initialize_from_masks(self._start_masks)
            self._start_masks = None
        else:
            x, y = self._to_device(*batch)
            self.engine.initialize(batch=(x, y), loss_fn=F.cross_entropy)
        self.sparsity_ready = True

    def start_from(self, contents: Any) -> LoadReport:
        """Load a checkpoint's weights to fine-tune from (``finetune.*``); call before :meth:`initialize_sparsity`.

        The weights (``finetune.weights``: the model's or the EMA's) are loaded strictly except a head for
        another class count, which keeps its fresh initialisation; the EMA restarts from the loaded weights.
        With ``finetune.masks=keep`` the checkpoint's sparse pattern becomes the engine's starting masks (a
        re-initialised head has none and starts dense). The optimizer, schedule and step count stay fresh.

        Args:
            contents: An :class:`orchestrator.weights.CheckpointContents`.

        Returns:
            What was loaded, re-initialised and ignored.
        """
        f = self.cfg.finetune
        report = load_pretrained(self.module, contents.weights(f.weights), new_head=True, args=contents.args)
        if self.ema is not None:
            self.ema.module.load_state_dict(self.module.state_dict())
        if self.engine is not None and f.masks == "keep":
            names = list(select_targets(self.module, self.cfg.sparse.targets))
            fresh = set(report.reinitialised)
            masks = contents.pattern_masks([n for n in names if n not in fresh])
            params = dict(self.module.named_parameters())
            masks.update({n: torch.ones_like(params[n], dtype=torch.bool) for n in names if n in fresh})
            self._start_masks = masks
        return report

    # ------------------------------------------------------------------ training
    def train_one_epoch(self, loader: Iterable, on_step: Callable[[Trainer, StepMetrics], None] | None = None
                        ) -> dict[str, float]:
        """Train until the end of the current epoch (continuing mid-epoch after a step checkpoint).

        Args:
            loader: This worker's training batches for this epoch (sampler epoch already set).
            on_step: Called after every optimizer step with the trainer and the step's
                :class:`StepMetrics` (``train/loss`` of that step, ``train/lr``, ``step``); the place for
                step checkpoints, logging and fault injection. Read ``train/loss`` only when it is needed:
                reading it waits for the step to finish on the device.

        Returns:
            Epoch metrics: ``train/loss`` (mean over micro-batches), ``train/lr``, ``perf/img_per_s`` (every
            worker's images over the wall clock of this worker's steps, loading and ``on_step`` included).
        """
        if self.engine is not None and not self.sparsity_ready:
            raise RuntimeError("call initialize_sparsity(batch) (or load_state_dict) before training")
        resume_rng = None
        if self.step_in_epoch == 0:
            self._epoch_rng = rng_state()
            self._sums = self._zero_sums()
        else:  # mid-epoch resume: replay the epoch's iterator from its start, then restore the saved RNG
            assert self._epoch_rng is not None
            resume_rng = rng_state()
            set_rng_state(self._epoch_rng)
        self.model.train()
        it: Iterator = iter(loader)
        skip = self.step_in_epoch * self.accumulation
        for _ in range(skip):
            next(it)
        if resume_rng is not None:
            set_rng_state(resume_rng)
        while self.step_in_epoch < self.steps_per_epoch:
            t0 = time.perf_counter()  # the wall clock of a step as users get it: data, step and hooks
            metrics = self._optimizer_step(it)
            if on_step is not None:
                on_step(self, metrics)
            self._sums["seconds"] += time.perf_counter() - t0
        s = self._sums
        counts = torch.tensor([s["micro"], s["images"]], dtype=torch.float64, device=self.device)
        totals = torch.cat([self._loss_sum.reshape(1), counts, self._distill_sums])
        if self.world_size > 1:  # the metric describes the whole job, not rank 0's shard
            dist.all_reduce(totals)
        loss, micro, images, loss_ce, loss_kd = totals.tolist()
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"train/loss is {loss} in epoch {self.epoch + 1} (up to optimizer step {self.step}); lower train.lr, "
                "set train.clip_grad, or use train.precision=fp32")
        out = {"train/loss": loss / max(micro, 1), "train/lr": self.lr_values[self.step - 1].item(),
               "perf/img_per_s": images / max(s["seconds"], 1e-9)}
        if self.teacher is not None:
            out.update({"train/loss_ce": loss_ce / max(micro, 1), "train/loss_kd": loss_kd / max(micro, 1)})
        return out

    def _loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch: the label loss, or the distillation loss with the teacher's
        logits on the same (mixed) input ``x``, its parts added to the epoch's sums."""
        if self.teacher is None:
            return self.train_loss_fn(logits, y)
        assert self.distill_loss is not None
        loss, ce, kd = self.distill_loss(logits, self.teacher(x), y)
        self._distill_sums += torch.stack([ce, kd]).double()
        return loss

    def _optimizer_step(self, it: Iterator) -> StepMetrics:
        lr = float(self.lr_values[self.step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        step_loss = torch.zeros((), device=self.device)
        images = 0
        for micro in range(self.accumulation):
            x, y = self._to_device(*next(it))
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            last = micro == self.accumulation - 1
            sync = self.model.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = self._loss(self.forward_model(x), x, y)
                self.scaler.scale(loss / self.accumulation).backward()
            step_loss += loss.detach().float()
            images += x.shape[0]
        clip = self.cfg.train.clip_grad
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.engine is not None:  # every step, also when the scaler skipped the update
            self.engine.on_optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.module, self.engine.masks if self.engine is not None else None, step=self.step)
        mean_loss = step_loss / self.accumulation
        self._loss_sum += mean_loss.double() * self.accumulation
        self._sums["micro"] += self.accumulation
        self._sums["images"] += images
        return StepMetrics(mean_loss, lr, self.step)

    def end_epoch(self) -> None:
        """Mark the current epoch complete (after its evaluation and before its checkpoint)."""
        self.epoch += 1
        self.step_in_epoch = 0
        self._epoch_rng = None

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, loader: Iterable, model: nn.Module | None = None) -> dict[str, float]:
        """Top-1/top-5 (%) and loss over this worker's shard, summed over all ranks."""
        return evaluate_model(self.forward_model if model is None else model, loader, device=self.device,
                              autocast=self._autocast, channels_last=self.cfg.train.channels_last)

    @torch.no_grad()
    def recalibrated_ema(self, loader: Iterable) -> nn.Module:
        """A copy of the EMA model whose BatchNorm statistics are recomputed on training batches.

        The EMA's running statistics average those of many past weights; one pass with the EMA
        weights themselves (cumulative average, ``momentum=None``) gives statistics that match them.
        """
        assert self.ema is not None
        n = self.cfg.train.bn_recalibration_batches
        model = copy.deepcopy(self.ema.module)
        if n <= 0:
            return model
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for i, (x, y) in enumerate(loader):
            if i >= n:
                break
            x, _ = self._to_device(x, y)
            with self._autocast():
                model(x)
        if self.world_size > 1:
            _average_bn_statistics(norms)
        model.eval()
        return model

    def evaluate_all(self, val_loader: Iterable, recal_loader: Iterable | None = None) -> dict[str, float]:
        """``val/*`` for the model, ``ema/*`` for the (recalibrated) EMA."""
        out = {f"val/{k}": v for k, v in self.evaluate(val_loader).items()}
        if self.ema is not None:
            ema_model = self.recalibrated_ema(recal_loader) if recal_loader is not None else self.ema.module
            out.update({f"ema/{k}": v for k, v in self.evaluate(val_loader, ema_model).items()})
        return out

    def sparsity_metrics(self) -> dict[str, float]:
        return self.engine.stats() if self.engine is not None and self.sparsity_ready else {}

    # ------------------------------------------------------------------ checkpointing
    def local_rng(self) -> dict[str, Any]:
        """What differs between ranks: RNG streams now and at the start of the epoch, and the running
        epoch sums of this rank's shard (gather these across ranks for a checkpoint)."""
        sums = {**self._sums, "loss": float(self._loss_sum)}
        if self.teacher is not None:
            sums["distill"] = self._distill_sums.tolist()
        return {"now": rng_state(), "epoch": self._epoch_rng, "sums": sums}

    def state_dict(self, rng_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything needed to continue bitwise: weights, EMA, optimizer, scaler, schedule position,
        sparsity engine, counters, epoch sums and the RNG streams of every rank (``rng_states``: the
        :meth:`local_rng` of each rank in rank order, gathered by the caller; default this process's)."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "config": self.cfg.to_flat(),
            "model": self.module.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"step": self.step, "total_steps": self.total_steps},
            "sparsity": self.engine.state_dict() if self.engine is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "rng": rng_states if rng_states is not None else [self.local_rng()],
            "teacher": ({"variant": self.teacher.identity.variant, "sha256": self.teacher.identity.sha256}
                        if self.teacher is not None else None),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (this rank takes its own RNG streams)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a trainer checkpoint (format {state.get('format')!r}, expected {_STATE_FORMAT!r})")
        total = state["scheduler"]["total_steps"]
        if total != self.total_steps:
            raise ValueError(
                f"checkpoint was made for {total} optimizer steps, this run has {self.total_steps} "
                "(train.epochs, train.global_batch_size, run.num_workers or the dataset changed); resume with the "
                "same settings or start a new run.name")
        recorded, teacher = state.get("teacher"), self.teacher
        if teacher is not None and recorded and recorded["sha256"] != teacher.identity.sha256:
            raise ValueError(
                f"the run was distilled from a teacher checkpoint with SHA-256 {recorded['sha256'][:12]}..., and "
                f"{teacher.identity.checkpoint} now has {teacher.identity.sha256[:12]}...; restore that file or "
                "start a new run.name")
        self.module.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.engine is not None:
            self.engine.load_state_dict(state["sparsity"])
            self.sparsity_ready = True
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        rngs = state["rng"]
        if len(rngs) != self.world_size:
            log.warning("checkpoint holds RNG streams of %d ranks, this run has %d: continuing, but not bitwise",
                        len(rngs), self.world_size)
        mine = rngs[self.rank % len(rngs)]
        self._epoch_rng = mine["epoch"]
        sums = dict(mine["sums"])
        self._loss_sum = torch.tensor(float(sums.pop("loss")), dtype=torch.float64, device=self.device)
        self._distill_sums = torch.tensor(sums.pop("distill", [0.0, 0.0]), dtype=torch.float64, device=self.device)
        self._sums = sums
        set_rng_state(mine["now"])
