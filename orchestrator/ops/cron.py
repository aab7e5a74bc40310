"""Cron expressions for ``raymerge schedule``, in UTC, parsed and stepped by ``croniter``.

Five fields (minute hour day-of-month month day-of-week) with ranges, steps, lists and names
(``MON``, ``JAN``), or a macro (``@hourly``, ``@daily``, ``@weekly``, ``@monthly``,
``@yearly``); day-of-week 0 or 7 is Sunday; when both day fields are restricted a day matches
either (Vixie cron). What Kubernetes CronJobs (``--render k8s``) do not have is refused:
croniter's seconds and year fields and its ``L``, ``#``, ``H`` and ``?`` extensions.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from croniter import croniter
from croniter.croniter import CroniterError

from orchestrator.errors import ConfigError

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
_ITEM = re.compile(r"^(\*|\d+|[a-z]{3})(-(\d+|[a-z]{3}))?(/\d+)?$", re.IGNORECASE)
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
    def fields(self) -> str:
        """The five-field form (a macro spelled out), for manifests."""
        return MACROS.get(self.text.lower(), self.text)

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
    unknown = [i for f in fields for i in f.split(",") if not _ITEM.match(i)] if not macro \
        else [f for f in fields if f.lower() not in MACROS]
    if unknown:
        raise ConfigError(f"{where}: {text!r} is not a cron expression ({', '.join(unknown)}): "
                          f"{_FORM}; macros: {', '.join(MACROS)}")
    try:
        croniter(text)
    except (CroniterError, ValueError) as e:
        raise ConfigError(f"{where}: {text!r} is not a cron expression ({e}): {_FORM}") from None
    return Cron(" ".join(fields))
