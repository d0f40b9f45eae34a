"""Reading the operator's YAML files (the config file, templates) with bounds: size, nesting, no aliases.

A YAML file is input an operator (or whoever can write the directory) controls, read by the broker
at start-up and on reload. So: a regular file only (a FIFO or ``/dev/zero`` never blocks or grows
memory), at most ``max_bytes`` read, UTF-8, nested at most ``max_depth`` levels, and no anchors or
aliases (a "billion laughs" file costs no more than reading it). Every problem is a
:class:`~jitp.errors.ConfigError` naming the file and line, never a traceback.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from jitp import errors


class _Refused(Exception):
    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses anchors and aliases and bounds nesting."""

    max_depth = 16
    what = "this file"

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                f"YAML anchors and aliases are not allowed in {self.what} (write each value out)",
                event.start_mark,
            )
        if self._depth >= self.max_depth:
            raise _Refused(f"nested deeper than {self.max_depth} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_text(path: Path, *, max_bytes: int, what: str) -> str:
    """The file's text: a regular file of at most ``max_bytes``, UTF-8. Never blocks on a FIFO."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise errors.ConfigError(f"cannot read {what}: {exc.strerror}", where=where) from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise errors.ConfigError(f"cannot read {what}: not a regular file", where=where)
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise errors.ConfigError(f"cannot read {what}: {exc.strerror}", where=where) from None
    if len(data) > max_bytes:
        raise errors.ConfigError(
            f"{what} is larger than {max_bytes // 1024} KiB; refusing to read it", where=where
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.ConfigError(f"cannot read {what}: not UTF-8 ({exc.reason})", where=where) from None


def compose(text: str, *, where: str, max_depth: int, what: str) -> yaml.Node | None:
    """The YAML node tree of ``text`` (None if empty), bounded as the module says; ``what`` names
    the kind of file in errors (plural: "templates")."""
    loader_class = type("_Loader", (_BoundedLoader,), {"max_depth": max_depth, "what": what})
    try:
        return yaml.compose(text, Loader=loader_class)
    except _Refused as exc:
        raise errors.ConfigError(exc.problem, where=f"{where}:{exc.mark.line + 1}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark is not None else where
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise errors.ConfigError(f"invalid YAML: {problem}", where=at) from None


def construct_scalar(node: yaml.Node) -> Any:
    """PyYAML's value of one node, or ValueError with a readable reason (a bad explicit tag such as
    ``!!int abc``, an unknown ``!foo`` tag, an integer of more than 4300 digits)."""
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ValueError(getattr(exc, "problem", None) or str(exc)) from None
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as exc:
        problem = str(exc) if isinstance(exc, ValueError) else f"not a valid {node.tag.rsplit(':', 1)[-1]}"
        raise ValueError(problem) from None
