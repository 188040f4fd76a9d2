"""Input -> a validated config: defaults, an embedded default layer, a YAML preset, ``key=value`` overrides.

Every way to make a config goes through here (:func:`load_config` for what a user gives,
:func:`replace` for the program's updates such as grid points and resources fitted to the cluster,
:func:`from_flat` for a flat form read back), and each one validates: the input-only ``model.kernel_size``
shorthand is expanded, values are converted to their types (:mod:`~orchestrator.config.coercion`), every
invalid setting (:mod:`~orchestrator.config.validation`) and every user setting without effect
(:mod:`~orchestrator.config.ignored`) is reported together in one :class:`ConfigError`. :func:`to_yaml`
writes a config back as a preset that reproduces it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config.coercion import typed_values
from orchestrator.config.ignored import ignored_settings, unused_section_settings
from orchestrator.config.schema import MODEL_ALIASES, SECTIONS, ExperimentConfig
from orchestrator.config.validation import ConfigError, invalid_settings

__all__ = ["expand_aliases", "from_flat", "load_config", "parse_overrides", "replace", "to_yaml"]

# warnings about the user's settings are logged under the config's name, as in orchestrator.config.ignored
logger = logging.getLogger(__package__)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML sections (or already dotted keys) -> ``{"section.field": value}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and "." not in name:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.lr=1e-3", "model.stage_kernels=[51,49,47,13]"]`` -> dict (values parsed as YAML).

    Raises:
        ConfigError: items without ``=``.
    """
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    out: dict[str, Any] = {}
    bad = []
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            bad.append(f"{item!r}: overrides are dotted key=value pairs, e.g. train.epochs=10")
            continue
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    if bad:
        raise ConfigError(bad)
    return out


def _expand_aliases(layer: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """One layer of input (a YAML file, the CLI overrides, one set of updates) with the reference's
    ``model.kernel_size`` shorthand replaced by the typed fields it sets.

    Layers are expanded one at a time, so a later layer's shorthand or field overrides an earlier
    layer's; within one layer, the shorthand together with one of its fields is a problem (which one
    was meant is unknown).
    """
    out = {str(k): v for k, v in layer.items()}
    for alias, targets in MODEL_ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        both = [t for t in targets if t in out]
        if both:
            problems.append(
                f"{alias}={value!r} and {', '.join(f'{t}={out[t]!r}' for t in both)} are both given: "
                f"{alias} is the reference's shorthand [M1, M2, M3, M4, N] that sets {', '.join(targets)}; "
                f"give either the shorthand or the fields")
            continue
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if value is None:
            out.update(dict.fromkeys(targets))
        elif isinstance(value, (list, tuple)) and len(value) == 5:
            stage_kernels, short_edge = list(value[:4]), value[4]
            out.update(zip(targets, (stage_kernels, short_edge, short_edge), strict=True))
        else:
            problems.append(
                f"{alias}={value!r}: the reference's shorthand needs exactly 5 numbers [M1, M2, M3, M4, N] "
                "(four stage kernels, then the short edge, which is also the small kernel), e.g. "
                f"[51, 49, 47, 13, 5]; or set {', '.join(targets)} one by one")
    return out


def expand_aliases(layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` with the input-only names of :data:`~orchestrator.config.schema.MODEL_ALIASES` replaced by the fields they set.

    Raises:
        ConfigError: a shorthand given together with one of its fields, or not 5 numbers.
    """
    problems: list[str] = []
    out = _expand_aliases(layer, problems)
    if problems:
        raise ConfigError(problems)
    return out


def _build(flat: Mapping[str, Any], problems: list[str] | None = None, *,
           given: Iterable[str] | None = None, defaults: Mapping[str, Any] | None = None,
           preset_only: Collection[str] = (), unused_sections: Mapping[str, str] | None = None
           ) -> ExperimentConfig:
    """The validated config of alias-free dotted names; ``problems`` already found are reported with it.

    With ``given`` (the names the user wrote), those whose value differs from ``defaults`` (the flat
    defaults the user started from) become :attr:`ExperimentConfig.user_set`, and the settings among
    them that would have no effect are reported: errors with the other problems, warnings logged once
    the config is valid (``preset_only``: see :func:`~orchestrator.config.ignored.ignored_settings`).
    ``unused_sections`` names whole sections the caller never reads, with why.
    """
    values, type_problems = typed_values(flat)
    problems = [*(problems or []), *type_problems]
    per_section: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in values.items():
        section, _, leaf = name.partition(".")
        per_section[section][leaf] = value
    # Bad names and types keep their defaults so the value checks below still run: one error lists all.
    cfg = ExperimentConfig(**{s: SECTIONS[s](**kw) for s, kw in per_section.items()})
    problems += invalid_settings(cfg)
    warnings: list[str] = []
    if given is not None:
        base = ExperimentConfig().to_flat() if defaults is None else defaults
        flat_values = cfg.to_flat()
        user_set = frozenset(n for n in given if n in flat_values and flat_values[n] != base.get(n))
        cfg = dataclasses.replace(cfg, user_set=user_set)
        errors, warnings = ignored_settings(cfg, preset_only)
        problems += errors
        warnings += unused_section_settings(cfg, unused_sections or {})
    if problems:
        raise ConfigError(problems)
    for line in warnings:
        logger.warning("%s", line)
    return _absolute_paths(cfg)


def _absolute_paths(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with a relative ``distill.teacher_checkpoint`` taken from the current directory, as the user
    meant it: the job's workers run elsewhere (other directories, other machines)."""
    path = cfg.distill.teacher_checkpoint
    if not path or Path(path).expanduser().is_absolute():
        return cfg
    absolute = str(Path(path).absolute())
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_checkpoint=absolute))


def _default_flat(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The flat defaults with an embedded defaults layer applied (values coerced, bad ones left out: the
    layer itself is validated as part of the config)."""
    return {**ExperimentConfig().to_flat(), **typed_values(defaults)[0]}


def from_flat(flat: Mapping[str, Any]) -> ExperimentConfig:
    """Inverse of :meth:`ExperimentConfig.to_flat`; missing names take their defaults. Validates.

    Raises:
        ConfigError: unknown names (with the nearest valid one), wrong types or bad values.
    """
    problems: list[str] = []
    return _build(_expand_aliases(flat, problems), problems)


def load_config(path: str | Path | None = None,
                overrides: Sequence[str] | Mapping[str, Any] | None = None, *,
                defaults: Mapping[str, Any] | None = None,
                unused_sections: Mapping[str, str] | None = None) -> ExperimentConfig:
    """Defaults <- ``defaults`` <- YAML preset (nested sections or dotted keys) <- dotted overrides, then
    validate.

    What the preset and the overrides set to a non-default value is the user's
    (:attr:`ExperimentConfig.user_set`); such a setting that would have no effect is an error when the
    run would silently differ from what was asked (``data.path`` with a generated source), else a
    logged warning (:func:`ignored_settings`).

    Args:
        path: A YAML preset, or None.
        overrides: Dotted ``key=value`` items or a mapping; they win over the preset.
        defaults: An embedded defaults layer under the preset (a script's built-in default). Its values
            count as defaults: a setting of it that a mode does not use is not reported.
        unused_sections: Sections the caller never reads, with why (e.g. ``tune`` in a single training
            run); settings the user gives in them are warned about.

    Raises:
        ConfigError: a missing/unreadable preset, unknown keys, wrong types, invalid values or settings
            that would silently have no effect.
    """
    problems: list[str] = []
    flat: dict[str, Any] = _expand_aliases(defaults or {}, problems)
    given: set[str] = set()
    preset: set[str] = set()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"--config {str(p)!r}: no such file; presets live in experiments/configs/"])
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"--config {str(p)!r}: not valid YAML ({exc})"]) from exc
        if not isinstance(tree, Mapping):
            raise ConfigError([f"--config {str(p)!r}: must hold a mapping of sections, got {type(tree).__name__}"])
        layer = _expand_aliases(_flatten(tree), problems)
        flat.update(layer)
        given.update(layer)
        preset.update(layer)
    layer = _expand_aliases(parse_overrides(overrides), problems)
    flat.update(layer)
    given.update(layer)
    return _build(flat, problems, given=given, defaults=_default_flat(_expand_aliases(defaults or {}, [])),
                  preset_only=preset - set(layer), unused_sections=unused_sections)


def replace(cfg: ExperimentConfig, updates: Mapping[str, Any]) -> ExperimentConfig:
    """A copy of ``cfg`` with dotted-name updates applied, validated; ``updates`` may use the
    ``model.kernel_size`` shorthand (a Tune experiment stored before the typed fields holds such points).

    The copy keeps ``cfg``'s :attr:`~ExperimentConfig.user_set`: updates come from the program (grid
    points, resources fitted to the cluster), not from the user, and are not checked for effect here.
    """
    problems: list[str] = []
    flat = cfg.to_flat()
    flat.update(_expand_aliases(updates, problems))
    return dataclasses.replace(_build(flat, problems), user_set=cfg.user_set)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as nested YAML (a preset that reproduces this job)."""
    tree: dict[str, dict[str, Any]] = {}
    for name, value in cfg.to_flat().items():
        section, leaf = name.split(".", 1)
        tree.setdefault(section, {})[leaf] = value
    return yaml.safe_dump(tree, sort_keys=False)
