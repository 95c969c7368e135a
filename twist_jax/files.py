"""Crash-safe file writes: a temporary sibling renamed into place, so readers (and a rerun after
a crash) never see half a file."""

import json
import os
import pathlib
import uuid
from typing import Any, Callable


def atomic_write(path, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` with a temporary sibling path, then renames it to `path`.

  The parent folder is created. On any error the temporary file is removed and `path` is left
  as it was (absent, or the previous complete version).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # A unique name per writer: two processes writing the same file do not clobber each other.
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    write(str(tmp))
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  atomic_write(path, write)


def write_json(path, obj: Any, *, sort_keys: bool = False) -> None:
  """`obj` as indented JSON with a final newline."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
