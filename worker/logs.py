"""Log set-up: JSON lines (or text) with job_id, task_id and tier when a record carries them.

Nothing here adds secrets: the key and image data never reach a log call in the first place.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

FIELDS = ("job_id", "task_id", "tier", "tiers")


class Repeats:
    """Says a lasting problem once, again when it changes, and otherwise at most every `remind_seconds`:
    a check that fails every second must not write a line every second."""

    def __init__(self, remind_seconds: float) -> None:
        self._remind = remind_seconds
        self._said: tuple[str, float] | None = None  # the last problem said, and when

    def news(self, problem: str) -> bool | None:
        """True when `problem` is new (say it), False when it is due a reminder, None when it goes unsaid."""
        now = time.monotonic()
        if self._said is None or self._said[0] != problem:
            self._said = (problem, now)
            return True
        if now - self._said[1] >= self._remind:
            self._said = (problem, now)
            return False
        return None

    def clear(self) -> bool:
        """The problem is over; True when one had been said."""
        said, self._said = self._said is not None, None
        return said


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = getattr(record, field, None)
            if value:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ids = " ".join(f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None))
        return f"{base} {ids}" if ids else base


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    text = TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else text
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries' chatter stays at warning: aiormq logs every frame at debug, httpx every request at info.
    for noisy in ("aiormq", "aio_pika", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
