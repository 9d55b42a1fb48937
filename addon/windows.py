"""Limit windows: when a pool's counting period starts and ends.

All arithmetic is done on local wall-clock dates in the configured time zone
and converted back to UTC, so DST changes give 23- or 25-hour days rather
than shifted midnights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

_ROLLING = re.compile(r"^rolling:(\d+)h$")
WINDOW_KINDS = ("day", "week", "month", "rolling:<N>h")


@dataclass(frozen=True, slots=True)
class Window:
    kind: str  # day | week | month | rolling:Nh
    rolling_hours: int | None = None

    @classmethod
    def parse(cls, text: str) -> Window:
        text = text.strip()
        if text in ("day", "week", "month"):
            return cls(text)
        match = _ROLLING.match(text)
        if match and int(match.group(1)) > 0:
            return cls(text, int(match.group(1)))
        raise ValueError(f"window must be one of {', '.join(WINDOW_KINDS)}, not {text!r}")

    def bounds(self, now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
        """(start, end) in UTC of the window containing `now` (aware)."""
        if self.rolling_hours is not None:
            return now - timedelta(hours=self.rolling_hours), now
        local = now.astimezone(tz).date()
        if self.kind == "day":
            start, end = local, local + timedelta(days=1)
        elif self.kind == "week":
            start = local - timedelta(days=local.weekday())
            end = start + timedelta(days=7)
        else:
            start = local.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
        return local_midnight(start, tz), local_midnight(end, tz)

    @property
    def is_rolling(self) -> bool:
        return self.rolling_hours is not None


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    """The UTC instant at which `day` begins in `tz`.

    Where midnight does not exist (a DST jump at 00:00), PEP 495's fold=0
    reading gives the instant of the jump: the day begins when the clocks do.
    """
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(timezone.utc)


def local_day(instant: datetime, tz: ZoneInfo) -> str:
    return instant.astimezone(tz).date().isoformat()


def iso_utc(instant: datetime) -> str:
    """ISO 8601 UTC with milliseconds: 2026-11-22T07:25:00.123Z."""
    return instant.astimezone(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
