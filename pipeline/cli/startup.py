"""What every command does before its work: find the config file, lay the environment over it, set up logging.

Config discovery, first match wins: `--config FILE`, then `$SPENDSTREAM_CONFIG`, then `./spendstream.yaml`,
else the built-in defaults. The environment rule is in schemas/config_env.py; flags win over both.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Final

from schemas.config import Config, load_config
from schemas.config_env import env_overrides, env_settings, unknown_env
from schemas.errors import SpendstreamError

log = logging.getLogger("spendstream")
CONFIG_ENV: Final = "SPENDSTREAM_CONFIG"
DEFAULT_CONFIG_FILE: Final = "spendstream.yaml"
#: a role's log file is rotated at this size; with the files kept, a role's logs stay under 40 MB
LOG_FILE_BYTES = 10 * 2**20
LOG_FILES_KEPT = 3
LOG_FORMATS: Final = ("text", "json")
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def version() -> str:
    try:
        return metadata.version("spendstream")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def find_config(flag: str | None, environ: Mapping[str, str], cwd: Path) -> tuple[Path | None, str]:
    """The config file to read and how it was found. A file named by the flag or the variable must exist."""
    if flag:
        return Path(flag), "--config"
    named = environ.get(CONFIG_ENV)
    if named:
        if not Path(named).is_file():
            raise SpendstreamError(f"${CONFIG_ENV} names {named}, which is not a file")
        return Path(named), f"${CONFIG_ENV}"
    local = cwd / DEFAULT_CONFIG_FILE
    if local.is_file():
        return local, "found in the working directory"
    return None, f"no --config, ${CONFIG_ENV} or ./{DEFAULT_CONFIG_FILE}"


def load(flag: str | None, environ: Mapping[str, str] = os.environ) -> tuple[Config, Path | None, str]:
    """The config (file, then environment), the file's absolute path, and the start-up line saying where from."""
    path, how = find_config(flag, environ, Path.cwd())
    config = load_config(path, env_overrides(environ))
    path = path.resolve() if path else None
    used = sorted(name for name in environ if name in env_settings())
    for name, close in unknown_env(environ).items():
        log.warning("%s is not a spendstream setting%s: ignored", name, f" (did you mean {close}?)" if close else "")
    return config, path, f"config: {path or 'built-in defaults'} ({how})" + (
        f"; from the environment: {', '.join(used)}" if used else "")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_file: str | None, fmt: str = "text", *,
                      max_bytes: int = LOG_FILE_BYTES) -> None:
    """One handler on the root logger, so our loggers and every library's (aiokafka, grpc, warnings) write the
    same format to the same place; handlers installed before are replaced."""
    handler: logging.Handler
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=LOG_FILES_KEPT)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # Python warnings too, instead of raw lines on stderr


def notice(message: str) -> None:
    """An event for the operator on stderr (`run` restarting a role, a dead broker): a `spendstream: ` line, or a
    log record when the logs are JSON, so whatever reads them sees one format."""
    if any(isinstance(handler.formatter, JsonFormatter) for handler in logging.getLogger().handlers):
        log.warning("%s", message)
    else:
        print(f"spendstream: {message}", file=sys.stderr, flush=True)
