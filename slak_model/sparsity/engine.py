"""``DynamicSparsity``: masks, prune-and-regrow updates, statistics and resume state.

The training loop owns the optimizer; the engine is told after each optimizer step
(``on_optimizer_step``) and then (1) zeroes every masked weight, (2) advances its own step
counter, (3) at steps t = k*f (until ``stop_fraction``) prunes ``ceil(p(t) * nnz)`` smallest
weights per layer and regrows exactly as many.

Deliberate differences from the reference (spec section 3; each one fixes a listed defect):
    * The engine never calls ``optimizer.step()``; masks are applied after EVERY optimizer step
      in every precision (the reference skips masking entirely under AMP). A step that a
      GradScaler skips changes no weight, and the mask is re-applied anyway.
    * Exact counts: init draws exactly round(d_l * n_l) active weights per layer and growth
      regrows exactly the pruned count, so every layer's count is invariant across updates.
    * Gradients are NOT masked (as in the reference): gradient and momentum growth need the
      dense signal at inactive positions, and AdamW's moments keep accumulating there. Instead,
      at every update the Adam moments (exp_avg, exp_avg_sq; SGD momentum_buffer) of every
      position that changed state (grown or pruned) are reset to 0, so a grown weight starts at
      0 with fresh moments (the reference leaves stale moments). Grown weights are already 0:
      they were inactive, and the mask was applied at the start of this call.
    * Under DDP the ranks agree by construction, not by broadcasting every mask every step:
      densities (and the dense-layer set) are decided on rank 0 and broadcast once (SNIP runs
      on every rank with its local batch, unlike the reference's DDP-averaged gradients, and
      rank 0's densities win); all ranks
      draw from the same seeded private generator; after init and after each update the flat
      mask buffer is broadcast once from rank 0, then a per-layer fingerprint is all-gathered
      and any disagreement raises an error naming the first differing layer.
    * Layers at or above ``dense_threshold`` after init leave the mask set, decided once from
      rank 0's densities (the reference decides per rank and can desynchronise collectives).
    * The step counter counts ``on_optimizer_step`` calls, i.e. optimizer steps after gradient
      accumulation, including steps a GradScaler skipped (the loop calls it for every step).
    * Statistics are metrics (``stats()``), not prints; ``sparsity/itop_rate`` is the fraction of
      the masked layers' weights that have ever been active (dense layers excluded).
    * A layer left with (next to) no weights is reported, not silent: after initialisation, after
      every update and after loading a state, layers at or below ``collapse_threshold`` are named in
      one warning (once per layer) and counted in ``sparsity/collapsed_layers``. The reference's SNIP
      produces such layers on small models and at high sparsity; ``min_density`` prevents them.
    * Masks, the step counter, the ITOP record and the generator state are part of
      ``state_dict()``, so a resumed run continues bit-for-bit (the reference saves no masks).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .._wrappers import unwrap_model
from .collective import Collective, LocalCollective
from .config import SparsityConfig
from .density import allocate_counts, erk_densities, snip_densities, uniform_densities
from .grow import grow_, growth_scores, momentum_of
from .masks import FlatMasks, draw_exact_masks, select_targets
from .prune import magnitude_prune_, prune_count
from .schedule import AdaptationSchedule

__all__ = ["DynamicSparsity", "layer_group"]

log = logging.getLogger(__name__)

_STATE_FORMAT = "slak-sparsity"
_STATE_VERSION = 1
_STAGE_RE = re.compile(r"^stages\.(\d+)\.")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


def layer_group(name: str) -> str:
    """The metric group of a parameter name: ``stem``, ``stages.0``..``stages.3``, ``head`` or ``other``.

    Groups are named like the modules that hold them, so a group in a metric key
    (``sparsity/density/stages.0``) is the prefix of its layers' names.
    """
    if name.startswith("stem."):
        return "stem"
    if name.startswith("head."):
        return "head"
    match = _STAGE_RE.match(name)
    if match:
        return f"stages.{int(match.group(1))}"
    return "other"


class DynamicSparsity:
    """Dynamic sparse training of a model's weights (SLaK / RigL family).

    Args:
        model: The model (a DDP wrapper is unwrapped). All targeted weights must share a device.
        config: The sparsity settings.
        total_steps: T, the optimizer steps of the whole run (the cosine schedule's length).
        collective: How ranks agree (None = single process). Every rank must build the engine
            with the same config and seed.

    Example:
        >>> engine = DynamicSparsity(model, SparsityConfig(init="erk"), total_steps=1000)
        >>> engine.initialize()
        >>> for x, y in loader:
        ...     loss_fn(model(x), y).backward()
        ...     optimizer.step()
        ...     engine.on_optimizer_step(optimizer)
        ...     optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig,
        total_steps: int,
        collective: Collective | None = None,
    ) -> None:
        if not isinstance(config, SparsityConfig):
            raise ValueError(f"config must be a SparsityConfig, got {type(config).__name__}")
        self.model = unwrap_model(model)
        self.config = config
        self.schedule = AdaptationSchedule(
            p0=config.prune_rate,
            p_min=config.prune_rate_min,
            update_frequency=config.update_frequency,
            total_steps=total_steps,
            stop_fraction=config.stop_fraction,
        )
        self.collective: Collective = collective if collective is not None else LocalCollective()
        self._targets: dict[str, nn.Parameter] = select_targets(self.model, config.targets)
        devices = {p.device for p in self._targets.values()}
        if len(devices) > 1:
            raise ValueError(f"all targeted weights must be on one device, found {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.step = 0
        self.updates = 0
        self._flat: FlatMasks | None = None
        self._params: list[nn.Parameter] = []
        self._nnz: list[int] = []
        self._dense: list[str] = []
        self._ever: torch.Tensor | None = None
        self._last: dict[str, Any] = {"pruned": 0, "grown": 0, "churn": 0.0}
        self._collapse_reported: set[str] = set()

    # ------------------------------------------------------------------ setup
    def initialize(
        self,
        batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Choose per-layer densities, draw the masks and zero the masked weights.

        Args:
            batch: ``(inputs, targets)``; required for ``init='snip'``.
            loss_fn: ``loss_fn(outputs, targets) -> scalar``; required for ``init='snip'``.

        Raises:
            ValueError: SNIP without ``batch`` or ``loss_fn``.
        """
        cfg = self.config
        shapes = {n: tuple(p.shape) for n, p in self._targets.items()}
        if cfg.init == "snip":
            if batch is None or loss_fn is None:
                raise ValueError(
                    "init='snip' needs one training batch and a loss: call initialize(batch=(inputs, targets), "
                    "loss_fn=loss) or use init='erk'/'uniform'"
                )
            # Every rank runs SNIP (so SyncBatchNorm's collectives inside the forward match up);
            # rank 0's densities are broadcast below and used everywhere.
            densities = snip_densities(self.model, list(shapes), batch, loss_fn, cfg.density, cfg.min_density)
        elif cfg.init == "erk":
            densities = erk_densities(shapes, cfg.density, cfg.min_density)
        else:
            densities = uniform_densities(shapes, cfg.density)
        if self.collective.world_size > 1:
            densities = self.collective.broadcast_object(densities, src=0)

        numels = {n: math.prod(s) for n, s in shapes.items()}
        if cfg.min_density > 0.0:
            counts = allocate_counts(densities, numels, int(sum(numels.values()) * cfg.density), cfg.min_density)
        else:
            counts = {n: min(numels[n], round(densities[n] * numels[n])) for n in shapes}
        self._dense = [n for n, s in shapes.items() if counts[n] >= cfg.dense_threshold * math.prod(s)]
        masked = [n for n in shapes if n not in self._dense]
        self._build(masked)
        assert self._flat is not None
        self._nnz = [counts[n] for n in masked]
        draw_exact_masks(self._flat, self._nnz, self.generator)
        self._sync_topology("initialisation")
        self._ever = self._flat.flat.clone()
        self.apply_masks()
        log.info(
            "sparsity init=%s: %d masked tensors, %d kept dense, overall density %.5f (target %.5f)",
            cfg.init, len(masked), len(self._dense), self.density(), cfg.density,
        )
        self._report_collapse("initialisation")

    @torch.no_grad()
    def initialize_from_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Start from given masks instead of drawing them: a fine-tune that keeps a trained sparse pattern.

        Every targeted layer must have a mask (``True`` = active), such as the masks of a saved engine or
        ``weight != 0`` of a released sparse checkpoint. A layer whose mask is at or above
        ``dense_threshold`` stays dense, as after :meth:`initialize`; the others keep their counts through
        the topology updates. ``sparsity``, ``init`` and ``min_density`` play no part: the pattern decides.

        Raises:
            ValueError: a targeted layer without a mask, or a mask of another shape (a different model or
                ``targets`` setting), naming the layer.
        """
        problems = [f"{n}: no mask given" for n in self._targets if n not in masks]
        problems += [f"{n}: mask shape {tuple(masks[n].shape)}, weight {tuple(p.shape)}"
                     for n, p in self._targets.items() if n in masks and tuple(masks[n].shape) != tuple(p.shape)]
        if problems:
            raise ValueError(f"the given masks do not fit this model's targeted layers (targets="
                             f"{self.config.targets!r}): " + "; ".join(problems))
        counts = {n: int(masks[n].count_nonzero()) for n in self._targets}
        self._dense = [n for n, p in self._targets.items()
                       if counts[n] >= self.config.dense_threshold * p.numel()]
        masked = [n for n in self._targets if n not in self._dense]
        self._build(masked)
        flat = self._require_init()
        for name in masked:
            flat.views[name].copy_(masks[name].to(device=self.device, dtype=torch.bool))
        self._nnz = [counts[n] for n in masked]
        self._sync_topology("initialisation")
        self._ever = flat.flat.clone()
        self.apply_masks()
        log.info("sparsity from given masks: %d masked tensors, %d kept dense, overall density %.5f",
                 len(masked), len(self._dense), self.density())
        self._report_collapse("initialisation")

    def _build(self, masked: list[str]) -> None:
        """Allocate the flat mask buffer for ``masked`` (in target order)."""
        self._flat = FlatMasks({n: self._targets[n].shape for n in masked}, device=self.device)
        self._params = [self._targets[n] for n in masked]

    def _require_init(self) -> FlatMasks:
        if self._flat is None:
            raise RuntimeError("DynamicSparsity is not initialised: call initialize() or load_state_dict() first")
        return self._flat

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight (one fused multi-tensor multiply)."""
        flat = self._require_init()
        if self._params:
            torch._foreach_mul_([p.data for p in self._params], [flat.views[n] for n in flat.names])

    @torch.no_grad()
    def on_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Call right after every ``optimizer.step()`` (also when a GradScaler skipped it), before ``zero_grad``.

        Args:
            optimizer: The optimizer; needed for momentum growth and to reset the moments of
                changed positions (without it the moments are left as they are).

        Returns:
            True when a topology update happened at this step.
        """
        self.apply_masks()
        self.step += 1
        if not self.schedule.is_update_step(self.step):
            return False
        self._update(optimizer)
        return True

    def _update(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Prune by magnitude and regrow, layer by layer, then agree across ranks."""
        flat = self._require_init()
        cfg = self.config
        if cfg.growth == "momentum" and optimizer is None:
            raise ValueError("growth='momentum' needs the optimizer: call on_optimizer_step(optimizer)")
        rate = self.schedule.rate(self.step)
        before = flat.flat.clone()
        removed_total = 0
        for i, param in enumerate(self._params):
            mask = flat.layer_flat(i)
            count = prune_count(rate, self._nnz[i])
            if count == 0:
                continue
            magnitude_prune_(mask, param, count)
            scores = growth_scores(
                cfg.growth,
                mask.numel(),
                device=mask.device,
                generator=self.generator,
                grad=param.grad,
                momentum=momentum_of(optimizer, param) if cfg.growth == "momentum" else None,
            )
            grow_(mask, scores, count)
            removed_total += count
        self._sync_topology(f"update at step {self.step}")

        born = flat.flat & ~before
        changed = flat.flat ^ before
        if optimizer is not None:
            self._reset_moments(optimizer, changed)
        self.apply_masks()
        assert self._ever is not None
        self._ever |= flat.flat
        self.updates += 1
        active = sum(self._nnz)
        self._last = {
            "pruned": removed_total,
            "grown": removed_total,
            "churn": born.sum() / max(active, 1),  # a device scalar; read lazily by stats()
        }
        log.debug("sparsity update %d at step %d: rate %.5f, %d weights moved", self.updates, self.step, rate,
                  removed_total)
        self._report_collapse(f"the update at step {self.step}")

    def _reset_moments(self, optimizer: torch.optim.Optimizer, changed: torch.Tensor) -> None:
        """Zero optimizer moments at positions that were grown or pruned."""
        flat = self._require_init()
        for i, param in enumerate(self._params):
            state = optimizer.state.get(param)
            if not state:
                continue
            view = changed[flat.offsets[i]: flat.offsets[i + 1]].view(param.shape)
            for key in _MOMENT_KEYS:
                buf = state.get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
                    buf.masked_fill_(view, 0)

    # ------------------------------------------------------------------ distributed
    def _sync_topology(self, when: str) -> None:
        """Broadcast the masks from rank 0 (one tensor) and check every rank holds the same ones."""
        flat = self._require_init()
        coll = self.collective
        if coll.world_size <= 1:
            return
        coll.broadcast_(flat.flat.view(torch.uint8), src=0)
        self.verify_consistency(when)

    def verify_consistency(self, when: str = "now") -> None:
        """All-gather per-layer fingerprints and raise if any rank differs from rank 0.

        Raises:
            RuntimeError: Naming the first layer (or layer list) that differs and the ranks involved.
        """
        flat = self._require_init()
        mine = (flat.names, self._dense, flat.hashes())
        gathered = self.collective.all_gather_object(mine)
        ref_names, ref_dense, ref_hashes = gathered[0]
        for rank, (names, dense, hashes) in enumerate(gathered[1:], start=1):
            if names != ref_names or dense != ref_dense:
                raise RuntimeError(
                    f"sparsity masks differ between rank 0 and rank {rank} after {when}: different masked layer "
                    f"sets ({len(ref_names)} vs {len(names)} masked, {len(ref_dense)} vs {len(dense)} dense); "
                    "every rank must build the engine with the same model and config"
                )
            for name, a, b in zip(names, ref_hashes, hashes):
                if a != b:
                    raise RuntimeError(
                        f"sparsity masks differ between rank 0 and rank {rank} after {when}: first differing layer "
                        f"{name!r} (active {a[0]} vs {b[0]})"
                    )

    # ------------------------------------------------------------------ views and stats
    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Read-only mapping name -> bool mask (views of the engine's buffer; dense layers absent)."""
        return MappingProxyType(dict(self._require_init().views))

    @property
    def dense_layers(self) -> list[str]:
        """Targeted layers kept dense after initialisation."""
        return list(self._dense)

    def layer_densities(self) -> dict[str, float]:
        """Name -> density of every targeted layer (1.0 for layers kept dense), no device sync."""
        flat = self._require_init()
        out = {n: 1.0 for n in self._dense}
        out.update({n: nnz / numel for n, nnz, numel in zip(flat.names, self._nnz, flat.numels)})
        return {n: out[n] for n in self._targets if n in out}

    def collapsed_layers(self) -> list[str]:
        """Masked layers whose density is at or below ``collapse_threshold`` (by default: no active weight).

        Such a layer passes nothing through its branch for the rest of the run (updates keep each layer's
        count). No device sync: the counts are held on the host.
        """
        flat = self._require_init()
        threshold = self.config.collapse_threshold
        return [n for n, nnz, numel in zip(flat.names, self._nnz, flat.numels) if nnz <= threshold * numel]

    def _report_collapse(self, when: str) -> None:
        """Warn once per layer about collapsed layers, naming them and the fix (rank 0 only: every rank
        holds the same masks)."""
        collapsed = self.collapsed_layers()
        new = [n for n in collapsed if n not in self._collapse_reported]
        if not new or self.collective.rank != 0:
            return
        self._collapse_reported.update(new)
        cfg = self.config
        rule = "no active weight" if cfg.collapse_threshold == 0 else f"density <= {cfg.collapse_threshold:g}"
        log.warning(
            "sparsity: %d of %d targeted layers collapsed (%s) after %s (init=%s, sparsity=%g, min_density=%g); "
            "they stay so for the whole run: %s. Set min_density (e.g. 0.05) to keep a floor in every layer, or "
            "lower the sparsity.",
            len(collapsed), len(self._targets), rule, when, cfg.init, cfg.sparsity, cfg.min_density,
            ", ".join(collapsed),
        )

    def density(self) -> float:
        """Overall density of the targeted weights (masked and dense ones), no device sync."""
        flat = self._require_init()
        dense_numel = sum(self._targets[n].numel() for n in self._dense)
        total = flat.total + dense_numel
        return (sum(self._nnz) + dense_numel) / total if total else 1.0

    def stats(self) -> dict[str, float]:
        """Slash-scoped metrics: overall and per-group density, rate, last update's counts, churn, ITOP.

        ``sparsity/itop_rate`` is the fraction of the masked layers' weights that were ever active;
        ``sparsity/churn`` the fraction of active weights that were inactive before the last update;
        ``sparsity/collapsed_layers`` the number of :meth:`collapsed_layers` (0 when none);
        ``sparsity/min_layer_density`` the lowest density of a masked layer; ``sparsity/density/<group>``
        per :func:`layer_group` (``stem``, ``stages.0``..``stages.3``, ``head``).
        """
        flat = self._require_init()
        numel: dict[str, int] = {}
        active: dict[str, int] = {}
        for name, d in self.layer_densities().items():
            g = layer_group(name)
            n = self._targets[name].numel()
            numel[g] = numel.get(g, 0) + n
            active[g] = active.get(g, 0) + round(d * n)
        out: dict[str, float] = {
            "sparsity/density": self.density(),
            "sparsity/sparsity": 1.0 - self.density(),
            "sparsity/prune_rate": self.schedule.rate(self.step),
            "sparsity/pruned": float(self._last["pruned"]),
            "sparsity/grown": float(self._last["grown"]),
            "sparsity/churn": float(self._last["churn"]),
            "sparsity/itop_rate": float(self._ever.sum()) / flat.total if flat.total and self._ever is not None
            else 1.0,
            "sparsity/step": float(self.step),
            "sparsity/updates": float(self.updates),
            "sparsity/masked_layers": float(len(flat.names)),
            "sparsity/dense_layers": float(len(self._dense)),
            "sparsity/collapsed_layers": float(len(self.collapsed_layers())),
            "sparsity/min_layer_density": min(
                (nnz / numel for nnz, numel in zip(self._nnz, flat.numels)), default=1.0),
        }
        for g in sorted(numel):
            out[f"sparsity/density/{g}"] = active[g] / numel[g]
        return out

    def next_update_step(self) -> int | None:
        """The optimizer step at which the next topology update happens (None if none remains)."""
        return self.schedule.next_update_step(self.step)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: masks, counters, ITOP record, RNG."""
        flat = self._require_init()
        assert self._ever is not None
        ever = self._ever
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "total_steps": self.schedule.total_steps,
            "step": self.step,
            "updates": self.updates,
            "dense": list(self._dense),
            "masks": {n: v.detach().cpu().clone() for n, v in flat.views.items()},
            "ever_active": {n: ever[flat.offsets[i]: flat.offsets[i + 1]].view(flat.shapes[n]).cpu().clone()
                            for i, n in enumerate(flat.names)},
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
            "last": {k: float(v) if k == "churn" else v for k, v in self._last.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this engine (no ``initialize()`` needed) and apply the masks.

        Raises:
            ValueError: The state is not an engine state, or its layers do not match this model.
        """
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a DynamicSparsity state (format {state.get('format')!r}, version {state.get('version')!r}); "
                f"expected {_STATE_FORMAT!r} version {_STATE_VERSION}"
            )
        masks: Mapping[str, torch.Tensor] = state["masks"]
        for name in list(masks) + list(state["dense"]):
            if name not in self._targets:
                raise ValueError(
                    f"saved sparsity state names layer {name!r}, which this model does not target "
                    f"(targets={self.config.targets!r}); build the same model and config as the saved run"
                )
        for name, m in masks.items():
            if tuple(m.shape) != tuple(self._targets[name].shape):
                raise ValueError(
                    f"saved mask of {name!r} has shape {tuple(m.shape)}, the model's weight {tuple(self._targets[name].shape)}"
                )
        if state["config"] != self.config.to_dict():
            log.warning("loading sparsity state saved with a different config: %s", state["config"])
        self._dense = list(state["dense"])
        self._build(list(masks))
        flat = self._require_init()
        for name, m in masks.items():
            flat.views[name].copy_(m.to(torch.bool))
        self._nnz = flat.counts()
        ever = FlatMasks(flat.shapes, device=self.device)
        for name, m in state["ever_active"].items():
            ever.views[name].copy_(m.to(torch.bool))
        self._ever = ever.flat
        self.step = int(state["step"])
        self.updates = int(state["updates"])
        self._last = dict(state["last"])
        if state["generator_device"] == self.device.type:
            self.generator.set_state(state["generator"])
        else:
            log.warning(
                "sparsity RNG state was saved on %s, engine runs on %s: reseeding from (seed, step); "
                "random growth will differ from the uninterrupted run",
                state["generator_device"], self.device.type,
            )
            self.generator.manual_seed(self.config.seed * 1_000_003 + self.step)
        if self.collective.world_size > 1:
            self.verify_consistency("load_state_dict")
        self.apply_masks()
        self._report_collapse("loading the saved state")
