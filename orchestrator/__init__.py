"""Ray Train / Ray Tune / MLflow orchestration of SLaK experiments (the only layer that touches Ray and MLflow).

Importing the package imports nothing heavy: ``orchestrator.config`` validates a config without torch or
timm (nor does the part of ``slak_model`` it uses), so a typo is reported in a fraction of a second.
Modules that use timm import ``slak_model`` first, which makes the torchvision guard
(``slak_model._compat``) run before timm is imported.
"""
