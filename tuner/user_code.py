"""Code of the user's that a run calls (``generate.callback``), found by a safe default and checked before any
of it runs.

A function comes from one of two places only:

- ``path/to/file.py:function``: a file the user names, on the command line (tuner/compose.py refuses the key
  when a recipe preset or a config set it);
- ``package.module.function`` (or ``package.module:function``): a module of an installed package, looked up
  without the current folder or the script's folder on the path, and refused when it is a file under the
  current folder that no installed location holds (a ``.py`` lying where the command runs is never imported by
  its name).

Each module's file is checked before it is imported, so a refused value has run nothing. The function's
signature is checked against the call it will get. A file is run once per process (per path and mtime): the
check and the run share what it made.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import inspect
import site
import sys
import sysconfig
from pathlib import Path

from tuner.errors import ConfigError

_LOADED: dict[tuple, object] = {}


def load_function(key: str, value: str, params: tuple[str, ...]):
    """The function ``value`` names (see the module's docstring), which must accept ``params`` positionally.

    Raises:
        ConfigError: naming ``key=value``, what is wrong and the fix; nothing was imported when the module's
            place is refused.
    """
    where, colon, name = value.rpartition(":")
    if colon and (where.endswith(".py") or "/" in where or "\\" in where):
        file = Path(where).expanduser()
        if not file.is_file() or file.suffix != ".py":
            raise ConfigError(f"{key}={value}: {where} is not a .py file; give path/to/file.py:function")
        stamp = file.stat()
        cache = (str(file.resolve()), stamp.st_mtime_ns, stamp.st_size, name)
        if cache not in _LOADED:
            _LOADED[cache] = _attribute(key, value, _load_file(key, value, file.resolve()), name)
        fn = _LOADED[cache]
    else:  # each time: its place is checked against the current folder (Python imports a module once)
        module, rest = _import_installed(key, value, where if colon else value, whole=bool(colon))
        fn = _attribute(key, value, module, name if colon else rest)
    _check_signature(key, value, fn, params)
    return fn


def _installed_places() -> list[Path]:
    places = [sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    places += [*getattr(site, "getsitepackages", list)(), site.getusersitepackages()]
    return [Path(p).resolve() for p in places if p]


def _refused_place(origin: str | None) -> Path | None:
    """The file or folder of a module's spec when it lies under the current folder and in no installed place."""
    if not origin or origin in ("built-in", "frozen"):
        return None
    path, here = Path(origin).resolve(), Path.cwd().resolve()
    if not path.is_relative_to(here) or any(path.is_relative_to(p) for p in _installed_places()):
        return None
    return path


def _search_path() -> list[str]:
    """``sys.path`` without the current folder ('' or its path) and the running script's folder."""
    here = Path.cwd().resolve()
    script = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] not in ("", "-", "-c") else None
    kept = []
    for entry in sys.path:
        resolved = Path(entry or ".").resolve()
        if entry not in ("", ".") and resolved != here and resolved != script:
            kept.append(entry)
    return kept


def _find_top(name: str):
    """The spec a top-level module would import from, found as ``import`` does but on ``_search_path``."""
    if name in sys.modules:
        return getattr(sys.modules[name], "__spec__", None)
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(name, _search_path())
        else:
            find = getattr(finder, "find_spec", None)
            spec = find(name, None) if find else None
        if spec is not None:
            return spec
    return None


def _check_spec(key: str, value: str, name: str, spec) -> None:
    if spec is None:
        raise ConfigError(
            f"{key}={value}: no installed module {name} (the current folder is not searched); install its "
            "package, or name the file: path/to/file.py:function"
        )
    places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
    refused = next((p for p in map(_refused_place, places) if p is not None), None)
    if refused is not None:
        raise ConfigError(
            f"{key}={value}: module {name} is {refused}, under the current folder and not installed; tuner does "
            "not import code by name from where it runs: name the file yourself, path/to/file.py:function"
        )


def _import_installed(key: str, value: str, dotted: str, whole: bool):
    """Import the module ``dotted`` names, its top package found on ``_search_path``, every level's place
    checked before it is imported. ``whole``: all of ``dotted`` is the module (``module:function``); else the
    deepest module of its leading parts, and the rest (the function's dotted name) is returned beside it."""
    parts = dotted.split(".")
    if not all(p.isidentifier() for p in parts) or (not whole and len(parts) < 2):
        raise ConfigError(f"{key}={value}: give package.module.function, or path/to/file.py:function")
    spec = _find_top(parts[0])
    _check_spec(key, value, parts[0], spec)
    if parts[0] not in sys.modules:  # imported from the spec just checked, not by a new search
        top = importlib.util.module_from_spec(spec)
        sys.modules[parts[0]] = top
        try:
            spec.loader.exec_module(top)
        except BaseException:
            sys.modules.pop(parts[0], None)
            raise
    name, i = parts[0], 1
    while i < len(parts) - (0 if whole else 1) and hasattr(sys.modules[name], "__path__"):
        child = f"{name}.{parts[i]}"
        spec = getattr(sys.modules.get(child), "__spec__", None) or importlib.util.find_spec(child)
        if spec is None:
            break
        _check_spec(key, value, child, spec)
        importlib.import_module(child)
        name, i = child, i + 1
    if whole and i < len(parts):
        _check_spec(key, value, f"{name}.{parts[i]}", None)
    return sys.modules[name], ".".join(parts[i:])


def _load_file(key: str, value: str, file: Path):
    """A .py file the user named, run as a module of its own (``tuner_user_<stem>_<hash of its path>``)."""
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_file_location(f"tuner_user_{file.stem}_{digest}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(spec.name, None)
        raise ConfigError(f"{key}={value}: importing {file} failed ({type(e).__name__}: {e})") from None
    return module


def _attribute(key: str, value: str, module, rest: str):
    """The (dotted) attribute ``rest`` of ``module``: a function."""
    target = module
    for part in rest.split(".") if rest else ():
        target = getattr(target, part, None)
    if not rest or target is None or not callable(target):
        where = getattr(module, "__file__", None) or module.__name__
        raise ConfigError(
            f"{key}={value}: no function {rest or '(none named)'} in {where}; "
            "give package.module.function or path/to/file.py:function"
        )
    return target


def _check_signature(key: str, value: str, fn, params: tuple[str, ...]) -> None:
    try:
        inspect.signature(fn).bind(*params)
    except (TypeError, ValueError) as e:
        try:
            shown = f"takes {inspect.signature(fn)}"
        except (TypeError, ValueError):
            shown = "has no signature Python can read"
        raise ConfigError(f"{key}={value}: {shown}; it must accept ({', '.join(params)}) ({e})") from None
