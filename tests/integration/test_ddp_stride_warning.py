"""DDP's stride warning is silenced only where gradient and bucket view have the same memory layout."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.distributed as dist
from servers import free_port

from orchestrator.ray_train import ignore_layout_equivalent_stride_warnings

PREFIX = ("Grad strides do not match bucket view strides. This may indicate grad was not created according to the "
          "gradient layout contract, or that the param's strides changed since DDP was constructed.  This is not an "
          "error, but may impair performance.\n")


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _stride_warnings() -> list[str]:
    """One DDP backward of timm's ConvNeXt (a distillation student) in a fresh warnings registry."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", num_classes=10)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp(torch.randn(2, 3, 64, 64)).sum().backward()
    mismatched = [(p.shape, p.stride(), p.grad.stride()) for p in model.parameters() if p.grad.stride() != p.stride()]
    for shape, param_strides, grad_strides in mismatched:  # the premise: only size-1 dimensions differ
        assert all(n == 1 or a == b for n, a, b in zip(shape, param_strides, grad_strides, strict=True)), shape
    return [str(w.message) for w in caught if "Grad strides" in str(w.message)]


def test_timm_convnext_warns_without_the_filter_and_not_with_it(one_rank_group) -> None:
    # TORCH_WARN_ONCE: the C++ side reports a process's first mismatch only, so the filter is checked on the
    # message that real backward gave.
    unsilenced = _stride_warnings()
    if not unsilenced:
        pytest.skip("this torch build gives timm's ConvNeXt gradients in its parameters' strides: nothing to silence")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_layout_equivalent_stride_warnings()
        warnings.warn(unsilenced[0], UserWarning, stacklevel=1)
    assert not caught, unsilenced[0]


@pytest.mark.parametrize(("message", "silenced"), [
    (("grad.sizes() = [1280, 320, 1, 1], strides() = [320, 1, 320, 320]\n"
      "bucket_view.sizes() = [1280, 320, 1, 1], strides() = [320, 1, 1, 1]"), True),
    (("grad.sizes() = [768, 1, 5, 5], strides() = [25, 1, 5, 1]\n"
      "bucket_view.sizes() = [768, 1, 5, 5], strides() = [25, 25, 5, 1]"), True),
    # a real transposition (channels-last weight of a 3x3 convolution): a different layout, still reported
    (("grad.sizes() = [64, 32, 3, 3], strides() = [288, 1, 96, 32]\n"
      "bucket_view.sizes() = [64, 32, 3, 3], strides() = [288, 9, 3, 1]"), False),
    (("grad.sizes() = [1280, 320, 1, 1], strides() = [1, 1280, 1, 1]\n"
      "bucket_view.sizes() = [1280, 320, 1, 1], strides() = [320, 1, 1, 1]"), False),
    (("grad.sizes() = [768, 1, 5, 5], strides() = [25, 1, 1, 5]\n"
      "bucket_view.sizes() = [768, 1, 5, 5], strides() = [25, 25, 5, 1]"), False),
])
def test_only_layout_equivalent_mismatches_are_silenced(message: str, silenced: bool) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_layout_equivalent_stride_warnings()
        warnings.warn(PREFIX + message + " (Triggered internally at reducer.cpp:335.)", UserWarning, stacklevel=1)
    assert (not caught) == silenced
