"""Ray Train / Ray Tune / MLflow orchestration of SLaK experiments (the only layer that touches Ray and MLflow).

Importing the package imports nothing heavy: ``orchestrator.config`` validates a config without torch or
timm, so a typo is reported in about a second. Modules that use timm import ``slak_model`` first, which
installs the torchvision guard (``slak_model._compat``) before timm is imported.
"""
