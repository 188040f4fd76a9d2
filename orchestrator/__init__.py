"""Ray Train / Ray Tune / MLflow orchestration of SLaK experiments (the only layer that touches Ray and MLflow)."""

from slak_model import _compat

_compat.install()
