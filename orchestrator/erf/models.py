"""The network an ERF job measures, with its weights, kernel sizes and row of the published Table 10."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import slak_model
from orchestrator.erf.settings import RANDOM_SEED, ErfError, ErfSettings
from slak_model.published import TABLE10

__all__ = ["ModelInfo", "build_erf_model", "slak_paper_row", "timm_paper_row"]

#: timm architectures -> their row of Table 10.
_TIMM_ROWS = {"resnet101": "ResNet-101", "resnet152": "ResNet-152", "convnext_tiny": "ConvNeXt-T"}


@dataclass(frozen=True)
class ModelInfo:
    """The kernel sizes of a measured network (``"51-49-47-13"``, ``"-"`` when unknown) and its Table 10 row."""

    kernel: str
    paper_row: str | None


def slak_paper_row(cfg: Any) -> str | None:
    """Which Table 10 row a SLaK-code network is: SLaK-T, or ConvNeXt-T as RepLKNet or plain."""
    if tuple(cfg.depths) != (3, 3, 9, 3) or tuple(cfg.dims) != (96, 192, 384, 768):
        return None
    kernels, mode, width = tuple(cfg.stage_kernels), cfg.kernel_mode, cfg.width_factor
    if mode == "decomposed" and kernels == (51, 49, 47, 13) and cfg.short_edge == 5 and width == 1.3:
        return "SLaK-T"
    if mode == "replknet" and kernels == (31, 29, 27, 13) and cfg.small_kernel == 5 and width == 1.0:
        return "ConvNeXt-T (RepLKNet)"
    if mode == "naive" and kernels == (7, 7, 7, 7) and width == 1.0:
        return "ConvNeXt-T"
    return None


def timm_paper_row(name: str) -> tuple[str, str | None]:
    """``(kernel sizes, Table 10 row)`` of a timm model: its architecture (the name before any ``.tag``)
    decides; which weights it carries is the table's ``weights`` column."""
    row = _TIMM_ROWS.get(name.split(".")[0])
    return (next(p.kernel for p in TABLE10 if p.model == row) if row else "-"), row


def _first_line(err: BaseException) -> str:
    """The first line of an error: torch's unpickling errors go on for paragraphs about ``weights_only``."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def build_erf_model(settings: ErfSettings) -> tuple[Any, ModelInfo]:
    """The network with its weights, and its kernel sizes and Table 10 row.

    Raises:
        CheckpointMismatchError: a SLaK checkpoint of another architecture (its message names the cause).
        ErfError: an unreadable checkpoint, a timm checkpoint that does not fit the model, or timm's pretrained
            weights out of reach.
    """
    import torch

    from slak_model.published import kernel_row

    torch.manual_seed(RANDOM_SEED)
    if settings.is_slak:
        model = slak_model.SLaK(settings.slak_config)
        if settings.checkpoint:
            from slak_model.checkpoint import load_official_checkpoint, read_checkpoint

            try:
                state = read_checkpoint(settings.checkpoint)
            except Exception as err:  # any unreadable file gets the same message
                raise ErfError(f"cannot read checkpoint {settings.checkpoint}: {_first_line(err)}") from err
            load_official_checkpoint(model, state)
        return model, ModelInfo(kernel_row(model.cfg.stage_kernels), slak_paper_row(model.cfg))

    import timm

    try:
        model = timm.create_model(settings.model, pretrained=settings.pretrained)
    except Exception as err:  # only the download can fail here: the name was checked
        raise ErfError(f"could not get timm's pretrained weights of {settings.model!r}: {err}; fetch them on a "
                       "machine with network access and pass the file with --checkpoint") from err
    if settings.checkpoint:
        try:  # timm's reader: .safetensors or torch files, the non-EMA weights first, "module." stripped
            state = timm.models.load_state_dict(settings.checkpoint, use_ema=False)
        except Exception as err:  # any unreadable file gets the same message
            raise ErfError(f"cannot read checkpoint {settings.checkpoint}: {_first_line(err)}") from err
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ErfError(f"checkpoint {settings.checkpoint} does not fit timm model {settings.model!r}: "
                           f"{err}") from err
    return model, ModelInfo(*timm_paper_row(settings.model))

