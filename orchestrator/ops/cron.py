"""Cron expressions for ``raymerge schedule``, in UTC, parsed and stepped by ``croniter``.

Five fields (minute hour day-of-month month day-of-week) with ranges, steps, lists and names
(``MON``, ``JAN``), or a macro (``@hourly``, ``@daily``, ``@weekly``, ``@monthly``,
``@yearly``); day-of-week 0 or 7 is Sunday; when both day fields are restricted a day matches
either (Vixie cron). Six- and seven-field forms (seconds, years) are refused: Kubernetes
CronJobs, which ``--render k8s`` writes, have none.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from croniter import croniter
from croniter.croniter import CroniterError

from orchestrator.errors import ConfigError

_FORM = ("expected 5 fields (minute hour day-of-month month day-of-week) or a macro such as "
         "@daily, e.g. '0 3 * * *'; values must lie in 0-59, 0-23, 1-31, 1-12 (or JAN-DEC) "
         "and 0-7 (or SUN-SAT), with ranges low-high and steps >= 1")


@dataclass(frozen=True)
class Cron:
    text: str

    def matches(self, at: datetime.datetime) -> bool:
        """Whether the minute of ``at`` (UTC) is one this expression fires in."""
        return croniter.match(self.text, at.replace(second=0, microsecond=0))

    def next_after(self, at: datetime.datetime) -> datetime.datetime:
        """The first time after ``at`` (UTC) this expression fires."""
        return croniter(self.text, at).get_next(datetime.datetime)

    @property
    def minutes(self) -> frozenset[int]:
        """The minutes of the hour it may fire in (all of them for ``*``)."""
        field = croniter(self.text).expanded[0]
        return frozenset(range(60)) if field == ["*"] else frozenset(field)


def parse(text: str, where: str = "cron") -> Cron:
    fields = text.split()
    macro = len(fields) == 1 and text.strip().startswith("@")
    if not macro and len(fields) != 5:
        raise ConfigError(f"{where}: {text!r} is not a cron expression: {_FORM}")
    try:
        croniter(text)
    except (CroniterError, ValueError) as e:
        raise ConfigError(f"{where}: {text!r} is not a cron expression ({e}): {_FORM}") from None
    return Cron(" ".join(fields))
