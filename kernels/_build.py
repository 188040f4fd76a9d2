"""Load (building on first use) the CUDA extension, once per process, and remember why it failed.

The build is never triggered by ``import kernels``: only by the first CUDA call, ``kernels.info`` or an
explicit :func:`load`. A failed build is logged once with the compiler's message and kept in
:func:`status`, so the dispatcher can explain itself instead of raising an import error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["CACHE_ENV", "ARCH_ENV", "DEFAULT_ARCH", "cache_dir", "load", "status", "sources", "arch_list"]

log = logging.getLogger(__name__)

CACHE_ENV = "SLAK_KERNEL_CACHE"
ARCH_ENV = "SLAK_CUDA_ARCH"
DEFAULT_ARCH = "8.0;9.0"
_CSRC = Path(__file__).resolve().parent / "csrc"

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None
_where: str = ""


def sources() -> list[Path]:
    """The binding (.cpp) and kernel (.cu) sources compiled into the extension."""
    return [_CSRC / "dwconv_binding.cpp", _CSRC / "cuda" / "dwconv_kernels.cu"]


def arch_list() -> str:
    """Target architectures: ``SLAK_CUDA_ARCH``, else ``TORCH_CUDA_ARCH_LIST``, else sm_80 + sm_90."""
    return os.environ.get(ARCH_ENV) or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in [*sources(), _CSRC / "dwconv.h"]:
        digest.update(path.read_bytes())
    digest.update(f"{torch.__version__}|{torch.version.cuda}|{arch_list()}".encode())
    return digest.hexdigest()[:12]


def cache_dir() -> Path:
    """Where builds live: ``SLAK_KERNEL_CACHE`` or the user cache dir, one folder per source/torch/arch hash.

    Keying the folder on the sources means an edited kernel never loads a stale binary.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slak_orchestrator" / "kernels"
    return base / f"dwconv-{_fingerprint()}"


def load(build: bool = True) -> ModuleType | None:
    """Return the compiled module, building it on first call; ``None`` when it cannot be had.

    Args:
        build: When False, only report what is already loaded (never start a compiler).
    """
    global _module, _error, _where
    if _module is not None or _error is not None or not build:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if not torch.cuda.is_available() or torch.version.cuda is None:
            _error = "torch has no CUDA device/runtime (torch.cuda.is_available() is False)"
            return None
        try:
            from torch.utils import cpp_extension

            folder = cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list()
            try:
                _module = cpp_extension.load(
                    name=f"slak_dwconv_{folder.name.split('-')[-1]}",
                    sources=[str(p) for p in sources()],
                    extra_include_paths=[str(_CSRC)],
                    extra_cflags=["-O3"],
                    extra_cuda_cflags=["-O3", "-lineinfo"],
                    build_directory=str(folder),
                    verbose=False,
                )
                _where = f"loaded from {folder} (arch {arch_list()})"
            finally:
                if previous is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = previous
        except Exception as exc:  # noqa: BLE001 - any compiler/linker/loader failure is reported, not raised
            message = str(exc).strip() or type(exc).__name__
            _error = f"CUDA extension build failed: {message[-3000:]}"
            log.warning("slak kernels: %s (falling back per SLAK_KERNEL_BACKEND; see python -m kernels.info)", _error)
    return _module


def status() -> tuple[bool | None, str]:
    """``(True, where)`` when loaded, ``(False, why)`` after a failure, ``(None, ...)`` when not tried yet."""
    if _module is not None:
        return True, _where
    if _error is not None:
        return False, _error
    return None, "not built yet: builds on the first CUDA call (or run python -m kernels.info)"


def _reset_for_tests() -> None:
    """Forget the load outcome (tests only)."""
    global _module, _error, _where
    _module, _error, _where = None, None, ""
