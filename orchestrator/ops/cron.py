"""Five-field cron expressions (minute hour day-of-month month day-of-week), in UTC.

Each field is ``*``, a number, a range ``a-b``, a step ``*/n`` or ``a-b/n``, or a comma list of
those; day-of-week 0 or 7 is Sunday. As in Vixie cron, when both day fields are restricted a day
matches either. Names (``MON``, ``JAN``) and ``@daily``-style macros are refused with a message.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from orchestrator.errors import ConfigError

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month is *
    any_weekday: bool  # day of week is *

    def matches(self, at: datetime.datetime) -> bool:
        """Whether the minute ``at`` (UTC) is one this expression fires in."""
        if at.minute not in self.minutes or at.hour not in self.hours \
                or at.month not in self.months:
            return False
        day_ok = at.day in self.days
        weekday_ok = (at.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return day_ok and weekday_ok
        return day_ok or weekday_ok


def parse(text: str, where: str = "cron") -> Cron:
    parts = text.split()
    if len(parts) != 5:
        raise ConfigError(f"{where}: {text!r} is not a cron expression: expected 5 fields "
                          "(minute hour day-of-month month day-of-week), e.g. '0 3 * * *'")
    values = [_field(p, name, lo, hi, where) for p, (name, lo, hi) in zip(parts, _FIELDS)]
    weekdays = frozenset(d % 7 for d in values[4])
    return Cron(text, *values[:4], weekdays, parts[2] == "*", parts[4] == "*")


def _field(text: str, name: str, lo: int, hi: int, where: str) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        rng, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if rng == "*":
                start, stop = lo, hi
            elif "-" in rng:
                a, b = rng.split("-", 1)
                start, stop = int(a), int(b)
            else:
                start = stop = int(rng)
                if step_text:
                    stop = hi
        except ValueError:
            raise ConfigError(f"{where}: {name} field {text!r}: expected numbers, ranges a-b, "
                              "steps */n and commas (no names)") from None
        if step < 1 or not lo <= start <= stop <= hi:
            raise ConfigError(f"{where}: {name} field {text!r}: values must lie in {lo}-{hi} "
                              "with ranges low-high and steps >= 1")
        out.update(range(start, stop + 1, step))
    return frozenset(out)
