"""``ExperimentConfig``: every setting of a training job as one frozen, validated dataclass tree.

Why one tree: the reference threads an ``argparse`` namespace through everything and packs unrelated
numbers into one flag. Here every setting has exactly one dotted name (``sparse.sparsity``,
``train.global_batch_size``) that is at once the YAML key path, the CLI override ``key=value``, the Ray
Tune search-space key and the MLflow param name. Validation happens once, before Ray starts, and reports
every problem together (name, value, what is allowed, the fix); a typo in a key suggests the nearest
valid name.

Its modules, one job each:

- ``schema``: the dataclass tree, its flat dotted form, the input-only aliases;
- ``coercion``: YAML and ``key=value`` values converted to the fields' types;
- ``validation``: every invalid setting, one line each, and :class:`ConfigError`;
- ``ignored``: the user's settings that the job would not use (errors and warnings);
- ``loading``: presets, overrides and updates -> a validated config, and back to YAML.

The four names below are this package's face for code outside the project (a notebook, a script of
one's own): what it takes to build, change and check a config. Modules of the project import each name
from the module that defines it, so that a module's imports say which job it relies on.
"""

from __future__ import annotations

from orchestrator.config.loading import load_config, replace
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.validation import ConfigError

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "replace"]
