"""What a config asks of the plan stage and of the backend.

Here rather than in pipeline/plan/: the plan stage takes its own `SchedulerSettings` (the
`defrag` command builds one without any config), so it knows nothing of YAML; the
translation follows from the declarations (each setting's `plan`, config/schema.py), which
live here.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..model import Method, Mode
from .schema import Config, DaemonSettings
from .walk import Plan, Setting, settings_of

if TYPE_CHECKING:
    from ..backends.protocol import Backend
    from ..pipeline.plan.scheduler import SchedulerSettings

log = logging.getLogger("memdefragd")


def _planned(s: Setting, plan: Plan, settings: DaemonSettings) -> Any:
    return plan.value(settings) if plan.value is not None else getattr(settings, s.name)


def scheduler_settings(config: Config) -> SchedulerSettings:
    """The scheduler's settings: each setting's daemon-wide value in the field its `plan`
    names and, for targets with overrides, their own values in its `by_target` field."""
    from ..pipeline.plan.scheduler import SchedulerSettings

    kw: dict[str, Any] = {}
    for s in settings_of(DaemonSettings):
        if s.plan is None:
            continue
        kw[s.plan.field] = _planned(s, s.plan, config.daemon)
        if s.plan.by_target:
            kw[s.plan.by_target] = {
                name: _planned(s, s.plan, own) for name, own in config.overrides.items()
            }
    return SchedulerSettings(**kw)


def methods(config: Config) -> set[Method]:
    """Every method the config asks for, daemon-wide or for some target."""
    return {config.daemon.method} | {own.method for own in config.overrides.values()}


def check_methods(config: Config, backend: Backend) -> tuple[Config, dict[str, str]]:
    """The config as it can run on this backend, and each method it asks for that this
    machine cannot carry out, with why.

    A method the backend does not implement at all (a simulator-only method on the kernel)
    is a mistake in the config: SystemExit, at start or reload. A method it implements but
    this machine lacks (MADV_COLLAPSE before Linux 6.1, a kernel without Translation
    Ranger) is not: the targets that ask for it are observed only (scanned, scored and
    exported; no memory moved), with an error in the log, so that an old kernel still
    gets a working observer rather than a daemon that will not start.
    """
    refused: dict[str, str] = {}
    demoted: set[str] = set()
    for method in sorted(map(str, methods(config))):  # plain strings: messages quote them
        reason = backend.refusal(method)
        if reason is None:
            continue
        if method not in backend.methods:
            raise SystemExit(f"memdefragd: method {method!r}: {reason}")
        refused[method] = reason
        enforcing = [
            t.name
            for t in config.targets
            if t.mode != Mode.OBSERVE and str(config.settings_for(t.name).method) == method
        ]
        if enforcing:
            log.error(
                "method %r cannot run on this machine (%s): target(s) %s are observed only "
                "(scanned, scored and exported; no memory is moved)",
                method,
                reason,
                ", ".join(enforcing),
            )
            demoted.update(enforcing)
        else:
            log.warning(
                "method %r cannot run on this machine (%s): its targets are all in observe "
                "mode, so memdefragd only measures them",
                method,
                reason,
            )
    if not demoted:
        return config, refused
    targets = tuple(
        replace(t, mode=Mode.OBSERVE) if t.name in demoted else t for t in config.targets
    )
    return replace(config, targets=targets), refused
