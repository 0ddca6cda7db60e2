"""Short errors for ``distill-pl``: one or two lines on stderr instead of a usage text or a traceback.

- Argument and config errors (unknown key, wrong type) print ``distill-pl <command>: error:``
  and the condensed message; an unknown key names the nearest valid key (``difflib``). Exit 2.
- The project's own errors (bad folders, manifests, shards, settings: ``ValueError`` and
  ``OSError`` raised by ``distill_pl`` code, wherever Lightning or jsonargparse wrapped them)
  print their message. Exit 1.
- An ``OSError`` about a named file or folder (a read-only or full disk, a missing file),
  wherever it was raised, prints its message, which names the path. Exit 1.

``--debug`` (anywhere on the command line) or ``DISTILL_PL_DEBUG=1`` restores the full
usage text and traceback. Other exceptions (bugs) always keep their traceback.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from pathlib import Path
from types import TracebackType
from typing import Callable, NoReturn

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # distill_pl/
DEBUG_FLAG = "--debug"
HINT = f"full message: add {DEBUG_FLAG} or set DISTILL_PL_DEBUG=1"


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("DISTILL_PL_DEBUG", "") not in ("", "0")


def without_debug_flag(argv: list[str]) -> list[str]:
    return [a for a in argv if a != DEBUG_FLAG]


def _init_arguments(class_path: str) -> list[str]:
    """The constructor argument names of ``class_path`` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except Exception:
        return []


def _configured_class_path(group: str, argv: list[str]) -> str | None:
    """The ``class_path`` of ``group`` (e.g. ``model``) that ``argv`` sets, from its
    ``--config`` files or a ``--group`` / ``--group.class_path`` flag (the last one wins)."""
    import yaml

    found = None
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            try:
                node = yaml.safe_load(Path(value).read_text())
                for part in group.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                found = (node.get("class_path") if isinstance(node, dict) else None) or found
            except (OSError, yaml.YAMLError):
                pass
        elif flag in (f"--{group}", f"--{group}.class_path") and not value.startswith("-"):
            found = value
    return found


def _suggestion(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def condensed_parse_error(message: str, options: list[str], argv: list[str]) -> str:
    """One line for a jsonargparse error ``message``; ``options`` are the parser's flags,
    ``argv`` the command line (its config files name the classes of nested arguments)."""
    unrecognized = re.search(r"unrecognized arguments: (.*)", message)
    if unrecognized:
        flags = [t.split("=")[0] for t in unrecognized.group(1).split() if t.startswith("--")]
        unknown = [f for f in flags if f not in options] or flags
        if unknown:
            return f"unknown key {unknown[0]}{_suggestion(unknown[0], options)}"
    not_accepted = re.search(r"does not accept (?:option|key) '([^']+)'", message)
    if not_accepted:
        key = "--" + not_accepted.group(1)
        return f"unknown key {key}{_suggestion(key, options)}"
    unknown_init_arg = re.search(
        r"Parser key \"([^\"]+)\".*?class_path '([^']+)'.*?Option '([^']+)' is not accepted", message, re.S
    )
    if unknown_init_arg:
        group, class_path, option = unknown_init_arg.groups()
        if class_path.count(".") < 2:  # checked against the base class before the config applied
            class_path = _configured_class_path(group, argv) or class_path
        valid = [f"--{group}.init_args.{a}" for a in _init_arguments(class_path)]
        key = f"--{group}.init_args.{option}"
        return f"unknown key {key} ({class_path.rpartition('.')[2]} has no argument {option!r}){_suggestion(key, valid)}"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if "Errors:" in lines:  # a union of types: keep the first alternative's reason
        errors = lines[lines.index("Errors:") + 1:]
        reason = [errors[0].lstrip("- ")] + [line for line in errors[1:3] if not line.startswith("-")]
        lines = [lines[0], *reason]
    return " ".join(lines)[:400]


class ShortErrors:
    """Mixin for jsonargparse parsers: errors in one line plus a hint, exit status 2."""

    debug = False
    argv: list[str] = []

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if self.debug or not self.exit_on_error:  # nested parsers raise to their caller
            super().error(message, ex)  # type: ignore[misc]
        parser = getattr(ex, "subcommand_parser", None) or self
        options = ["--config", *(o for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--"))]
        prog = parser.prog.replace(" [options]", "").split()
        name = " ".join(["distill-pl", *prog[1:]]) if prog else "distill-pl"
        sys.stderr.write(f"{name}: error: {condensed_parse_error(message, options, self.argv)}\n")
        sys.stderr.write(f"(options: {name} --help; {HINT})\n")
        sys.exit(2)


def _raised_by_project(tb: TracebackType | None) -> bool:
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and PACKAGE_DIR in Path(last.tb_frame.f_code.co_filename).resolve().parents


def project_error(err: BaseException) -> BaseException | None:
    """The first error of ``err``'s chain (itself, its causes and the contexts it does not
    suppress) that ``distill_pl`` code raised as a ValueError, an OSError or one of its own
    error classes, or that the system raised about a named file or folder (an OSError with a
    ``filename``: permission denied, disk full, no such file), wherever it was raised: a
    message meant for the user."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        own_class = type(err).__module__.startswith("distill_pl.")
        about_a_file = isinstance(err, OSError) and err.filename is not None
        if about_a_file or ((own_class or isinstance(err, (ValueError, OSError)))
                            and _raised_by_project(err.__traceback__)):
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def run_with_short_errors(function: Callable[[], object], name: str, debug: bool) -> None:
    """Call ``function``; a project error becomes one line on stderr and exit status 1."""
    try:
        function()
    except Exception as err:
        found = None if debug else project_error(err)
        if found is None:
            raise
        text = str(found).strip() or type(found).__name__
        if not isinstance(found, (ValueError, OSError)):  # the project's own error class names the failure
            text = f"{type(found).__name__}: {text}"
        sys.stderr.write(f"{name}: error: {' '.join(text.split())}\n({HINT})\n")
        sys.exit(1)
