"""Logging: a concise console and a rotating log file, both on the "transferlab" logger.

Modules log with `logging.getLogger("transferlab")` (main.py with its child
"transferlab.main"), so their records reach the two handlers set up here:

    setup_logging(level="INFO", file="logs/transferlab.log")

- console (stderr): `level` and above, one short line per record, no tracebacks unless
  the level is DEBUG;
- file: `level` or INFO, whichever is lower, with times and full tracebacks, rotated at
  `max_bytes` (0 = never) keeping `backup_count` old files.

A record logged with `extra={"console": False}` goes to the file only: main.py uses it to
keep the traceback of a failed run out of the terminal.
"""
import logging
import logging.handlers
import sys
from pathlib import Path

LOGGER_NAME = "transferlab"
_CONSOLE = "transferlab.console"  # handler names, so a second call can find and replace them
_FILE = "transferlab.file"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler that looks up sys.stderr on every record, not once at creation,
    so it keeps working when a notebook or a test swaps sys.stderr."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass

    def emit(self, record):
        # progress bars (report.Progress, tqdm) stand aside for the line and redraw below it,
        # so a log line is never glued to a half-drawn bar
        try:
            from tqdm import tqdm
        except ImportError:
            return super().emit(record)
        with tqdm.external_write_mode(file=self.stream):
            super().emit(record)


class _ConsoleFormatter(logging.Formatter):
    """"WARNING something happened": one line; tracebacks only at DEBUG."""

    def __init__(self, show_tracebacks):
        super().__init__("%(levelname)-7s %(message)s")
        self.show_tracebacks = show_tracebacks

    def format(self, record):
        if self.show_tracebacks:
            return super().format(record)
        return self.formatMessage(_without_traceback(record))


def _without_traceback(record):
    record = logging.makeLogRecord(record.__dict__)
    record.message = record.getMessage()
    record.exc_info = record.exc_text = record.stack_info = None
    return record


def _wanted_on_console(record):
    return getattr(record, "console", True)


def setup_logging(level="INFO", file="logs/transferlab.log", max_bytes=1_000_000,
                  backup_count=3):
    """Attach the console and file handlers to the "transferlab" logger and return it.

    Idempotent: a second call replaces the handlers of the first (new level, new file)
    instead of adding more, so every record is still written once.
    Creates the log file's directory if needed.
    """
    level = logging.getLevelName(level) if isinstance(level, str) else level
    if not isinstance(level, int):
        raise ValueError(f"unknown log level {level!r}")
    file_level = min(level, logging.INFO)

    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if handler.name in (_CONSOLE, _FILE):
            logger.removeHandler(handler)
            handler.close()

    console = _StderrHandler()
    console.name = _CONSOLE
    console.setLevel(level)
    console.setFormatter(_ConsoleFormatter(show_tracebacks=level <= logging.DEBUG))
    console.addFilter(_wanted_on_console)

    path = Path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
    to_file.name = _FILE
    to_file.setLevel(file_level)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))

    logger.addHandler(console)
    logger.addHandler(to_file)
    logger.setLevel(file_level)  # the lower of the two, so each handler gets what it wants
    return logger
