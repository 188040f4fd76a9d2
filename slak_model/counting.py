"""Parameters and multiply-accumulates of a SLaK model, dense and sparsity-aware, total and per stage.

What the paper calls FLOPs are multiply-accumulates of the convolutions and linear layers counted on
nonzero weights only: ``sum_conv nnz(W) * H_out * W_out + sum_linear nnz(W) * tokens`` (biases, norms
and activations are negligible and left out). That convention reproduces the README numbers exactly
(SLaK-T 8.705 G dense, x0.6 -> 5.22 G); the reference's own hook-based counter does not (it counts the
per-token pointwise linears once per image). The count here is analytic: every conv/linear's output
size follows from the module structure and the input size, so no forward pass runs and models built on
the ``meta`` device count too (their weights are taken as dense).

Stages: ``stem`` (stem conv + norm), ``stages.0``..``stages.3`` (named like their modules
``stages.{i}``, the names the parameters and the sparsity metrics use; each with its ``downsample``: the 2x2
conv that enters a stage is counted with it, as the paper's per-stage tables group it), ``head`` (final
norm + classifier).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ._wrappers import unwrap_model
from .layers import DepthwiseConv

__all__ = ["Complexity", "StageComplexity", "count_complexity"]


@dataclass
class StageComplexity:
    """Counts of one stage. ``params`` counts every parameter (1-D included; buffers excluded)."""

    params: int = 0
    nonzero_params: int = 0
    macs: int = 0
    sparse_macs: int = 0


@dataclass
class Complexity:
    """Counts of a whole model at one input size.

    Attributes:
        params: All parameters (dense).
        nonzero_params: Parameters that are nonzero (or unmasked); the paper's sparse "#Params".
        macs: Dense multiply-accumulates of convs and linears for one image.
        sparse_macs: The same on nonzero weights only; the paper's "FLOPs".
        per_stage: ``stem``, ``stages.0``..``stages.3``, ``head`` -> :class:`StageComplexity`.
        image_size: Input (H, W) the MACs are for.
    """

    params: int = 0
    nonzero_params: int = 0
    macs: int = 0
    sparse_macs: int = 0
    per_stage: dict[str, StageComplexity] = field(default_factory=dict)
    image_size: tuple[int, int] = (224, 224)

    @property
    def gmacs(self) -> float:
        """Dense GMACs (1e9)."""
        return self.macs / 1e9

    @property
    def sparse_gmacs(self) -> float:
        """Sparsity-aware GMACs (1e9), the paper's "FLOPs" in G."""
        return self.sparse_macs / 1e9

    @property
    def flops(self) -> int:
        """Alias of :attr:`sparse_macs`: what the paper prints as FLOPs."""
        return self.sparse_macs

    def to_dict(self) -> dict:
        """Plain nested dict (for JSON / tracking)."""
        return asdict(self)


def _stage_of(name: str) -> str:
    if name.startswith("stem"):
        return "stem"
    if name.startswith("stages."):
        return f"stages.{int(name.split('.')[1])}"
    return "head"


def _spatial_sizes(model: nn.Module, image_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Output (H, W) of every stage: stem conv 4x4/4, then one 2x2/2 conv at the start of stages 2..n."""
    h, w = image_size
    h, w = (h - 4) // 4 + 1, (w - 4) // 4 + 1
    sizes = {"stem": (h, w)}
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
        sizes[f"stages.{i}"] = (h, w)
    sizes["head"] = (1, 1)
    return sizes


def _nonzero(
    name: str, param: torch.Tensor, masks: Mapping[str, torch.Tensor] | None, density: float | None
) -> int:
    eligible = param.dim() in (2, 4)
    if density is not None:
        return int(round(density * param.numel())) if eligible else param.numel()
    if masks is not None:
        if name in masks:
            mask = masks[name]
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"masks[{name!r}] has shape {tuple(mask.shape)} but the parameter has "
                    f"{tuple(param.shape)}; pass masks keyed by model.named_parameters() names"
                )
            return int(mask.count_nonzero())
        return param.numel()
    if param.is_meta or not eligible:  # 1-D params (biases, norms, gamma) are never sparse: count them whole
        return param.numel()
    return int(param.count_nonzero())


def count_complexity(
    model: nn.Module,
    image_size: int | tuple[int, int] = 224,
    masks: Mapping[str, torch.Tensor] | None = None,
    sparsity: float | None = None,
) -> Complexity:
    """Count parameters and MACs of a SLaK model (see the module docstring for the conventions).

    Args:
        model: A :class:`~slak_model.model.SLaK` (merged or not; a DDP wrapper is unwrapped).
        image_size: Input side, or ``(H, W)``.
        masks: Parameter name (as in ``model.named_parameters()``) -> bool mask; named tensors count
            their mask's ones, the others count dense. ``None``: count the nonzeros of the 2-D/4-D
            weights (1-D parameters such as zero-initialised biases count whole; all dense on the
            ``meta`` device).
        sparsity: Instead of masks, the expected counts of a uniform ``sparsity`` over every 2-D/4-D
            weight (each keeps ``round((1 - sparsity) * numel)``), e.g. to predict a run's cost.

    Returns:
        A :class:`Complexity`.
    """
    model = unwrap_model(model)
    if not hasattr(model, "stages") or not hasattr(model, "stem"):
        raise ValueError(
            f"count_complexity needs a SLaK model (stem/stages/head), got {type(model).__name__}"
        )
    if masks is not None and sparsity is not None:
        raise ValueError("give masks or sparsity, not both: masks are exact, sparsity is a uniform estimate")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}: must be in [0, 1)")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"image_size={image_size!r}: needs H and W >= 32 (the network downsamples 32x)")
    density = None if sparsity is None else 1.0 - sparsity
    spatial = _spatial_sizes(model, size)
    stages = {name: StageComplexity() for name in spatial}
    nnz_of = {}
    for name, param in model.named_parameters():
        nnz = _nonzero(name, param, masks, density)
        nnz_of[name] = nnz
        stage = stages[_stage_of(name)]
        stage.params += param.numel()
        stage.nonzero_params += nnz
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear, DepthwiseConv)):
            continue
        stage_name = _stage_of(name)
        h, w = spatial[stage_name]
        positions = 1 if stage_name == "head" else h * w  # linears in blocks run once per token
        stage = stages[stage_name]
        stage.macs += module.weight.numel() * positions
        stage.sparse_macs += nnz_of[f"{name}.weight"] * positions
    total = Complexity(per_stage=stages, image_size=size)
    for s in stages.values():
        total.params += s.params
        total.nonzero_params += s.nonzero_params
        total.macs += s.macs
        total.sparse_macs += s.sparse_macs
    return total
