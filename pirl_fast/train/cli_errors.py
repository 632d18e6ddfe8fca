"""A bad command line in one line and exit status 2, as every other user error of the trainer.

Hydra reports a misspelt key, a wrong type or an unknown group option in several lines (plus its
config search path) and exits 1. `run_cli(main)` runs the Hydra entry point with HYDRA_FULL_ERROR
set, so that such an error reaches it as an exception, and prints it as one line with the fix:

    error: trainer.max_step is not a config key; did you mean trainer.max_steps? ...
    error: model=resnet5 is not an option of the model group; choose one of resnet18, resnet50 ...

Only errors raised before the task function runs (composition, override parsing) are turned into
one line here (and our own RuntimeWarnings print as one plain line each); errors of the run
itself are loop.main's to report (USER_ERRORS), and anything else keeps its full traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from pirl_fast.train.config import Config

SEE_ALL = "python -m pirl_fast.train --cfg job prints every key and its value"


def config_keys() -> list[str]:
    """Every key of the schema, dotted (trainer.max_steps, data.batch_size, ...), groups included."""
    out: list[str] = []

    def walk(node: type, prefix: str) -> None:
        for f in dataclasses.fields(node):
            out.append(f"{prefix}{f.name}")
            kind = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
    walk(Config, "")
    return out


def closest(word: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def one_line(e: BaseException) -> str:
    """The composition error `e` as one line: what was wrong and the fix."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, option = e.missing_cfg_file.rsplit("/", 1)
        options = list(e.options or [])
        near = closest(option, options)
        return (f"{group}={option} is not an option of the {group} group; choose one of {', '.join(options)}"
                + (f" (did you mean {group}={near}?)" if near else ""))
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        near = closest(key, config_keys())
        return f"{key} is not a config key; " + (f"did you mean {near}? ({SEE_ALL})" if near else SEE_ALL)
    if isinstance(cause, OmegaConfBaseException) and key:
        return f"{key}: {first_line(str(cause))} ({SEE_ALL})"
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"bad command line: {'; '.join(lines) or type(e).__name__}"


PACKAGE = str(Path(__file__).resolve().parents[1])


def plain_warning(message, category, filename, lineno, line=None) -> str:
    """Our own RuntimeWarnings (resume notices, a checkpoint skipped) as one plain line: 'warning: ...',
    without the source line Python echoes; every other warning as Python formats it."""
    if issubclass(category, RuntimeWarning) and str(Path(filename).resolve()).startswith(PACKAGE):
        return "warning: " + "; ".join(part.strip() for part in str(message).splitlines() if part.strip()) + "\n"
    return PYTHON_FORMAT(message, category, filename, lineno, line)


PYTHON_FORMAT = warnings.formatwarning


def run_cli(main: Callable[[], None]) -> None:
    """Call the Hydra-decorated `main`; a composition error becomes one line on stderr and exit 2."""
    task = getattr(main, "__wrapped__", main).__code__
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    warnings.formatwarning = plain_warning
    try:
        main()
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        if any(frame.f_code is task for frame, _ in traceback.walk_tb(e.__traceback__)):
            raise  # the run itself failed, not its configuration
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # under torchrun: once per node
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
