"""A run's identity includes its config: the same run folder never continues under different settings.

Running the same command again continues a run (a training job by ``run.name``, a Tune experiment by
``--resume``). That is only safe when the settings that shape the result are the ones the run started with:
otherwise the numbers it reports would belong to a config nobody asked for. The first start of a run writes
those settings into its folder under ``run.storage_path`` (``slak_run_config.json``, plus ``config.yaml``
that ``--config`` accepts); every later start compares and refuses a difference, listing each setting.

Settings that do not change what is computed (how often to log, evaluate or checkpoint, loader processes)
may change on a continuation; the change is recorded. The ``run.``, ``tracking.`` and ``tune.`` sections
describe where and how a run executes, not what it computes, and are not part of its identity.

A recorded identity may use an input-only name the flat config no longer has (``model.kernel_size``, the
reference's shorthand for ``model.stage_kernels``, ``model.short_edge`` and ``model.small_kernel``): it is
read in today's names before comparing, so such a run still continues under the same settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyarrow import fs as pafs

from orchestrator.config.loading import expand_aliases
from orchestrator.config.schema import ExperimentConfig
from orchestrator.config.validation import ConfigError

__all__ = ["CHANGEABLE_ON_CONTINUE", "IDENTITY_FILE", "RunConfigMismatchError", "check_or_record", "identity"]

log = logging.getLogger(__name__)

IDENTITY_FILE = "slak_run_config.json"
CONFIG_FILE = "config.yaml"
RUN_ONLY_SECTIONS = ("run.", "tracking.", "tune.")
CHANGEABLE_ON_CONTINUE = frozenset(
    {"data.workers", "train.log_every_steps", "train.checkpoint_every_steps", "train.eval_every_epochs",
     "sparse.collapse_threshold"}
)
_MISSING = "<not set>"
#: Why a setting cannot change on a continuation, where that is not obvious.
_WHY_FIXED = {
    "train.epochs": "the learning-rate and sparsity schedules are cosines over the planned length of the run, "
                    "so every step already taken depends on it: more epochs is a new run, not a continuation",
}


class RunConfigMismatchError(ValueError):
    """A run folder exists under this name with other settings; the message lists them and the ways out."""


def identity(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that shape a run's result: the flat config without the run-only sections."""
    return {k: v for k, v in flat.items() if not k.startswith(RUN_ONLY_SECTIONS)}


def _filesystem(storage: str) -> tuple[pafs.FileSystem, str]:
    if "://" in storage:
        return pafs.FileSystem.from_uri(storage)
    return pafs.LocalFileSystem(), str(Path(storage).expanduser().absolute())


def _read(filesystem: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _write(filesystem: pafs.FileSystem, path: str, text: str) -> None:
    with filesystem.open_output_stream(path) as f:
        f.write(text.encode())


def _in_current_names(stored: dict[str, Any]) -> dict[str, Any]:
    """A recorded identity with input-only names (also inside a Tune experiment's ``grid``) expanded."""
    try:
        out = expand_aliases(stored)
    except ConfigError as err:  # left as recorded: the comparison then lists the difference
        log.debug("recorded settings kept as they are: %s", err)
        out = dict(stored)
    if isinstance(out.get("grid"), list):
        out["grid"] = [_in_current_names(p) if isinstance(p, dict) else p for p in out["grid"]]
    return _json_ready(out)


def _with_new_settings_at_default(stored: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded identity with the settings added to the project since it was recorded, at their defaults.

    A run started before a setting existed was computed with that setting's default behaviour (a new
    setting defaults to what the code did before it), so continuing it with the default changes nothing;
    any other value is still a difference.
    """
    defaults = _json_ready(ExperimentConfig().to_flat())
    added = {k: defaults[k] for k in new if k not in stored and k in defaults and k != "grid"}
    return {**stored, **added}


def _json_ready(value: Any) -> Any:
    """How a value reads back from JSON (tuples become lists), so stored and new values compare equal."""
    return json.loads(json.dumps(value, default=str))


def check_or_record(
    storage: str,
    run_name: str,
    settings: Mapping[str, Any],
    *,
    yaml_text: str,
    what: str = "run",
) -> list[str]:
    """Record ``settings`` for a new run, or check them against what the run was started with.

    Args:
        storage: ``run.storage_path`` (a local folder or a pyarrow URI such as ``s3://bucket/path``).
        run_name: The run's folder name under ``storage``.
        settings: The identity (see :func:`identity`; a Tune experiment adds its grid).
        yaml_text: The whole config as YAML, kept beside the identity so the run can be continued with it.
        what: "run" or "experiment", for messages.

    Returns:
        The changeable settings that differ from the stored ones (now recorded); empty for a new run.

    Raises:
        RunConfigMismatchError: a setting that shapes the result differs.
    """
    filesystem, root = _filesystem(storage)
    folder = f"{root.rstrip('/')}/{run_name}"
    path = f"{folder}/{IDENTITY_FILE}"
    new = _json_ready(dict(settings))
    stored = _read(filesystem, path)
    if stored is None:
        filesystem.create_dir(folder, recursive=True)
        _write(filesystem, path, json.dumps(new, indent=1, sort_keys=True))
        _write(filesystem, f"{folder}/{CONFIG_FILE}", yaml_text)
        return []
    stored = _with_new_settings_at_default(_in_current_names(stored), new)
    differing = sorted(k for k in set(stored) | set(new) if stored.get(k, _MISSING) != new.get(k, _MISSING))
    blocking = [k for k in differing if k not in CHANGEABLE_ON_CONTINUE]
    if blocking:
        lines = "\n".join(f"  {k}: {stored.get(k, _MISSING)!r} when it started, {new.get(k, _MISSING)!r} now"
                          + (f" ({_WHY_FIXED[k]})" if k in _WHY_FIXED else "") for k in blocking)
        raise RunConfigMismatchError(
            f"{what} {run_name!r} under {storage} was started with other settings, and continuing it would "
            f"report results for a config nobody asked for:\n{lines}\n"
            f"To start a new {what}, choose another run.name (or leave run.name unset: a training job's name "
            f"is then derived from its settings). To continue this {what} as it was started, drop those "
            f"overrides, or pass --config {folder}/{CONFIG_FILE}.")
    if differing:
        log.info("continuing %s %r with changed settings that do not alter its results: %s", what, run_name,
                 ", ".join(f"{k}={new.get(k)!r}" for k in differing))
        _write(filesystem, path, json.dumps(new, indent=1, sort_keys=True))
    return differing
