"""Schedules as Airflow 3 reads them: its presets and 5-field cron expressions, checked strictly.

Example::

    from tf_export_pipeline.schedules import cron_problem
    assert cron_problem("*/3 * * * *") is None
    assert cron_problem("0 25 * * *") == "hour 25 is not in 0-23"
"""

from __future__ import annotations

from pydantic_core import PydanticCustomError

# What Airflow 3 takes as a schedule string: its own presets (@once, @continuous, its cron presets) and
# those its cron library knows besides.
SCHEDULE_PRESETS = ("@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly",
                    "@annually", "@midnight")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (field name, lowest, highest, names from the lowest value on); day of week 7 is Sunday too
_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day of month", 1, 31, ()),
                ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))


def _cron_value(text: str, low: int, high: int, names: tuple[str, ...], field: str) -> int:
    if text.isascii() and text.isdigit():
        value = int(text)
    elif text.lower() in names:
        value = low + names.index(text.lower())
    else:
        raise ValueError(f"{field} {text!r} is not a number" + (" or a name" if names else ""))
    if not low <= value <= high:
        raise ValueError(f"{field} {value} is not in {low}-{high}")
    return value


def cron_problem(expression: str) -> str | None:
    """Why ``expression`` is not a 5-field cron expression (numbers, names, ``*``, ranges, steps, lists), or None.

    Stricter than the cron library Airflow uses, which takes and misreads more (a reversed range, a
    step beyond its field): a schedule that does something else than it says is worse than an error.
    """
    fields = expression.split()
    if len(fields) != 5:
        return f"{len(fields)} fields, not 5"
    for text, (field, low, high, names) in zip(fields, _CRON_FIELDS):
        for item in text.split(","):
            base, slash, step = item.partition("/")
            try:
                if slash and not (step.isascii() and step.isdigit() and int(step) >= 1):
                    raise ValueError(f"{field} step {step!r} is not a whole number from 1")
                if base == "*" or (base == "?" and not slash and field in ("day of month", "day of week")):
                    continue
                first, dash, last = base.partition("-")
                start = _cron_value(first, low, high, names, field)
                if dash:
                    end = _cron_value(last, low, high, names, field)
                    if end < start:
                        raise ValueError(f"{field} range {base!r} runs backwards")
            except ValueError as err:
                return str(err)
    return None


def check_schedule(value: str | None) -> str | None:
    """``value`` if it is a schedule Airflow reads (none, a preset, or a 5-field cron expression), else a
    validation error naming what is wrong."""
    if value is None or value in SCHEDULE_PRESETS:
        return value
    problem = cron_problem(value)
    if problem is None:
        return value
    # Five fields are meant as cron: say which one is wrong. Anything else is just not a schedule.
    detail = f"{value!r}: {problem}" if len(value.split()) == 5 else repr(value)
    raise PydanticCustomError("schedule", "not a cron expression or preset ({detail})", {"detail": detail})
