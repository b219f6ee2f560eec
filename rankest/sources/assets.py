"""Offline assets shipped inside registry packages (the embedded teacher and corpus).

Files are found through the package's import location *without importing it* (importing
gensim, say, would pull scipy and its own compiled stack for nothing).
"""

from __future__ import annotations

import importlib.util
import pathlib

from rankest.errors import UserError


def package_file(package: str, relative: str, *, what: str, install: str) -> pathlib.Path:
    """Path of ``relative`` inside the installed ``package``, or UserError saying how to install it.

    what : str — what the file is for, e.g. "the embedded corpus" (for the message)
    install : str — the command that installs the package
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{what} needs the Python package {package}: {install}")
    for folder in spec.submodule_search_locations:
        candidate = pathlib.Path(folder) / relative
        if candidate.is_file():
            return candidate
    raise UserError(f"the package {package} is installed without {relative}; reinstall it: {install}")
