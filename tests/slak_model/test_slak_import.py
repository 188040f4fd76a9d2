"""``import slak_model`` is cheap (no torch, no timm) and still registers the variants with timm.

Each case runs in a fresh interpreter: the test process has torch and timm imported already.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_settings_import_without_torch_and_timm_registers_later() -> None:
    out = _run(
        """
        import sys
        import slak_model
        from slak_model.sparsity import SparsityConfig
        import orchestrator.config
        heavy = sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)
        assert heavy == [], heavy
        assert SparsityConfig(sparsity=0.5).density == 0.5 and slak_model.SLaKConfig().short_edge == 5

        import timm  # the torchvision guard runs first (CPU-only torch), then the variants are registered
        assert set(timm.list_models("slak_*")) == {"slak_base", "slak_small", "slak_test", "slak_tiny"}
        assert type(timm.create_model("slak_test")).__name__ == "SLaK"
        assert not any(type(f).__name__ == "_TimmImportHook" for f in sys.meta_path)
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_registration_from_any_entry_point() -> None:
    out = _run(
        """
        import sys
        from slak_model.layers import LargeKernelConv  # timm is imported while slak_model.layers loads
        import timm
        assert "slak_tiny" in timm.list_models("slak_*")

        # timm imported before slak_model's hook could see it: the variants are registered at once
        from timm.models import _registry
        from slak_model import _timm_hook
        for name in timm.list_models("slak_*"):
            _registry._model_entrypoints.pop(name)
        del sys.modules["slak_model.variants"]
        _timm_hook.install()
        assert "slak_tiny" in timm.list_models("slak_*")
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_lazy_names_resolve() -> None:
    import slak_model
    import slak_model.sparsity

    for package in (slak_model, slak_model.sparsity):
        assert set(package.__all__) <= set(dir(package))
        for name in package.__all__:
            assert getattr(package, name) is not None, name
