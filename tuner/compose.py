"""Composing one run's configuration: ``conf/`` (the config groups), a ``recipes/`` preset and the
user's ``key=value`` overrides, on the schema of tuner/config.py (hydra's compose API, offline).

With ``checkpoint=`` inside a tuner run and no model chosen, the run's own base model is taken.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tuner.config import DIGIT_WORDS, TunerConfig
from tuner.errors import ConfigError

_HERE = Path(__file__).resolve().parent
# a checkout: conf/ and recipes/ at the top of the repo; the installed wheel: tuner/presets/{conf,recipes}
_BASE = _HERE.parent if (_HERE.parent / "recipes").is_dir() and (_HERE.parent / "conf").is_dir() else _HERE / "presets"
CONF_DIR = Path(os.environ.get("TUNER_CONF_DIR", _BASE / "conf"))
RECIPES_DIR = Path(os.environ.get("TUNER_RECIPES_DIR", _BASE / "recipes"))


def _digit_word(k) -> str:
    if str(k) not in [str(d) for d in range(10)]:
        raise ValueError(f"${{digit_word:{k}}}: subject.digit must be 0..9")
    return DIGIT_WORDS[int(k)]


if not OmegaConf.has_resolver("digit_word"):
    # recipes write prompts like "a photo of the digit ${digit_word:${subject.digit}}"
    OmegaConf.register_new_resolver("digit_word", _digit_word)
if not OmegaConf.has_resolver("is_set"):
    # recipes turn a setting on when another is given: prior.enabled: ${is_set:${data.class_prompt}}
    OmegaConf.register_new_resolver("is_set", lambda value: value is not None and value != "")


def list_recipes() -> dict[str, str]:
    """Recipe names with the first line of each recipe's leading comment."""
    recipes = {}
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        recipes[path.stem] = first.lstrip("# ").strip()
    return recipes


def compose(recipe: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose the configuration of one recipe with the user's overrides.

    Raises:
        ConfigError: the recipe does not exist, or a key is unknown, a value of the wrong type or outside
            its vocabulary; the message names the key (``explain``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore

    overrides = [_spelled(o) for o in overrides or []]
    _check_dirs()
    if not (RECIPES_DIR / f"{recipe}.yaml").is_file():
        known = ", ".join(list_recipes()) or "none"
        raise ConfigError(f"unknown recipe {recipe!r}: {RECIPES_DIR} has {known}")
    ConfigStore.instance().store(name="tuner_schema", node=TunerConfig)
    # recipes/ is searched as a config root, so `recipes` is a config group of _global_ presets
    search = f"hydra.searchpath=[file://{RECIPES_DIR.parent}]"
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(
                "config", overrides=[search, f"+{RECIPES_DIR.name}@_global_={recipe}"] + list(overrides or [])
            )
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(explain(e, recipe, list(overrides or []))) from None
    cfg.recipe = recipe
    _check_loops(cfg)
    _code_only_from_the_command_line(cfg, recipe, list(overrides or []))
    _native_resolution(cfg, list(overrides or []))
    _inherit_model(cfg, list(overrides or []))
    if cfg.resume not in (None, "auto") and not cfg.output_dir:  # resume=PATH: the checkpoint's own run folder
        checkpoint = Path(cfg.resume).expanduser().resolve()
        if (checkpoint / "state.pt").is_file():
            cfg.output_dir = str(checkpoint.parent.parent)
    return cfg


def _check_dirs() -> None:
    """The folders ``TUNER_CONF_DIR`` and ``TUNER_RECIPES_DIR`` name (read at import) exist and hold what they must."""
    for variable, folder, inside in (
        ("TUNER_CONF_DIR", CONF_DIR, "config.yaml"),
        ("TUNER_RECIPES_DIR", RECIPES_DIR, None),
    ):
        if variable not in os.environ:
            continue
        like = f"point it at a folder like {_BASE / ('conf' if inside else 'recipes')}, or unset it"
        if not folder.is_dir():
            raise ConfigError(f"{variable}={folder}: no such folder; {like}")
        if inside and not (folder / inside).is_file():
            raise ConfigError(f"{variable}={folder}: no {inside} in it; {like}")


# the keys that name files or folders (``[]``: in every item of a list)
PATH_KEYS = (
    "output_dir", "home", "checkpoint", "resume", "model.path", "model.config", "data.instance_dir", "data.class_dir",
    "data.val_dir", "data.sources[].path", "cache.dir", "sample.refiner", "eval.clip", "eval.dino",
    "generate.adapters[].path", "generate.prompt_file", "generate.init_image", "generate.refiner",
    "merge.inputs[].path", "extract.tuned",
)  # fmt: skip


def _check_loops(cfg: DictConfig) -> None:
    """A path that is a symbolic link loop (``ln -s loop loop``), or runs through one, is refused naming its key
    before anything resolves it."""
    import errno

    for key in PATH_KEYS:
        section, _, name = key.partition("[].")
        found = OmegaConf.select(cfg, section or key, default=None, throw_on_resolution_failure=False)
        items = [(key, found)]
        if name:  # a key of every item of a list
            items = [(f"{section}[{i}].{name}", item.get(name)) for i, item in enumerate(found or [])]
        for where, value in items:
            if not isinstance(value, str) or not value:
                continue
            try:
                os.stat(Path(value).expanduser())
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ConfigError(
                        f"{where}={value}: a symbolic link loop (a link that points back to itself, directly or "
                        f"through other links); point {where} at a real file or folder"
                    ) from None
            except ValueError:  # a NUL byte: not a path at all; the checks of the key name it
                continue


# keys whose schema field cannot carry their name (a Python keyword): as written -> as stored
SPELLED = {"export.from": "export.from_"}


def _spelled(override: str) -> str:
    """``export.from=best`` as the schema stores it (``export.from_``)."""
    key, eq, value = override.partition("=")
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    return f"{prefix}{SPELLED.get(key.lstrip('+~'), key.lstrip('+~'))}{eq}{value}"


# keys whose value names code of the user's that a run calls: taken from the command line only
CODE_KEYS = ("generate.callback",)


def _code_only_from_the_command_line(cfg: DictConfig, recipe: str, overrides: list[str]) -> None:
    """A key naming code to run (``CODE_KEYS``) is refused when a recipe preset or a config group set it, not the
    user's own ``key=value``: a preset or a copied config must not run a file it names."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key in CODE_KEYS:
        section, name = key.rsplit(".", 1)
        value = raw.get(section, {}).get(name)
        if value is not None and not given & {key, section}:
            raise ConfigError(
                f"{key}={value}: set by recipes/{recipe}.yaml or a config in {CONF_DIR.name}/, not on the command "
                f"line; it names code to run, so tuner takes it only from your own {key}=... (delete it there)"
            )


def _native_resolution(cfg: DictConfig, overrides: list[str]) -> None:
    """With ``model.path`` a diffusers folder (or a single file with ``model.config``) and ``model.resolution``
    not given, the size the base draws by default, as its diffusers pipeline takes it: the denoiser's
    ``sample_size`` (in latents) times the VAE's downscale. ``data.resolution`` follows it unless given.
    A denoiser without a ``sample_size`` (Flux's) takes its VAE's ``sample_size``, which is in pixels (1024 for
    FLUX.1's), else keeps the family's size."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "model.resolution" in given or not cfg.model.path:
        return
    folder = Path(cfg.model.path).expanduser()
    if folder.is_file():
        folder = Path(cfg.model.config).expanduser() if cfg.model.config else None
    configs = [folder / name / "config.json" for name in ("unet", "transformer")] if folder else []
    config = next((c for c in configs if c.is_file()), None)
    try:
        size = json.loads(config.read_text()).get("sample_size") if config else None
        vae = json.loads((folder / "vae" / "config.json").read_text())
        levels = len(vae.get("block_out_channels") or ())  # none in the video-style VAEs (Qwen-Image's)
    except (OSError, ValueError, KeyError, TypeError):
        return  # the checks name what is wrong with the folder
    if isinstance(size, int) and size > 0 and levels:
        cfg.model.resolution = size * 2 ** (levels - 1)
    elif isinstance(vae.get("sample_size"), int) and vae["sample_size"] > 0:  # Flux's: its VAE's, in pixels
        cfg.model.resolution = vae["sample_size"]


# keys a run folder's config.yaml never passes on: loading pickles (code) is the user's own say, each time
NEVER_INHERITED = ("model.allow_pickle",)


def _inherit_model(cfg: DictConfig, overrides: list[str]) -> None:
    """With ``checkpoint=`` (or a generate adapter, or a merge input) inside a tuner run and no model chosen, take
    that run's base model and resolution, and its prompts and instance images; keys the user set stay as set."""
    first = cfg.checkpoint or next((a.path for a in [*cfg.generate.adapters, *cfg.merge.inputs]), None)
    if not first or cfg.model.path or cfg.model.builtin:
        return
    folder = run_folder_of(first)
    if folder is not None:
        source = OmegaConf.load(folder / "config.yaml")
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        for group in ("model", "base"):
            for key, value in source[group].items():
                if f"{group}.{key}" not in given and f"{group}.{key}" not in NEVER_INHERITED:
                    cfg[group][key] = value
        if "data.resolution" not in given:
            cfg.data.resolution = source.data.resolution
        for key in ("instance_prompt", "class_prompt", "instance_dir"):  # what evaluate and the gallery compare
            if f"data.{key}" not in given and source.data.get(key) is not None:
                cfg.data[key] = source.data[key]


def run_folder_of(path: str | Path) -> Path | None:
    """The tuner run folder ``path`` is (or lies in, up to three levels down), recognised by its config and summary."""
    path = Path(path).expanduser().resolve()
    for folder in [path, *path.parents][:4]:
        if (folder / "config.yaml").is_file() and (folder / "summary.json").is_file():
            return folder
    return None


def _known_keys(cfg, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        node = cfg._get_node(key)
        keys += _known_keys(node, f"{path}.") if isinstance(node, DictConfig) else [path]
    return keys


def _unparsable(overrides: list[str]) -> str | None:
    """The first ``key=value`` override Hydra's grammar cannot parse, if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            return override if "=" in override else None
    return None


def _quoted(key: str, value: str) -> str:
    """``key='value'`` as Hydra reads it, and the whole argument quoted for a shell."""
    inner = f'"{value}"' if "'" in value and '"' not in value else "'" + value.replace("'", "\\'") + "'"
    argument = f"{key}={inner}"
    whole = shlex.quote(argument) if any(c in argument for c in '"$`\\!') else f'"{argument}"'
    return f"{argument} (in a shell, quote the whole argument too: {whole})"


def explain(error: Exception, recipe: str, overrides: list[str] = ()) -> str:
    """A Hydra or OmegaConf error as one readable message naming the key, with a suggestion where one fits."""
    text = str(error)
    unparsed = _unparsable(overrides)
    if unparsed:  # a value with characters Hydra's override grammar reserves (<, >, brackets, ...) unquoted
        key, value = unparsed.split("=", 1)
        return f"{unparsed}: Hydra cannot read this value as written; quote it, {_quoted(key, value)}"
    ambiguous = re.match(r"Ambiguous value for argument '(([^=']+)=(.*))'", text)
    if ambiguous:  # `key=a, b`: a comma makes a list or a sweep unless the value is quoted
        written, key, value = ambiguous.groups()
        return (
            f"{written}: Hydra reads an unquoted comma as several values. To use it as string, quote the value: "
            f"{_quoted(key, value)}; to use it as a list, {key}=[value1,value2]; to sweep over it, add -m"
        )
    match = re.search(r"Could not override '([^']+)'|Key '([^']+)' (?:is )?not in", text)
    keys = None
    if match:
        key = match.group(1) or match.group(2)
        keys = _known_keys(compose(recipe))
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        return f"unknown config key '{key}'.{hint} (python -m tuner recipe={recipe} print_config shows every key)"
    cause = error.__cause__ or error.__context__
    if cause is not None and "full_key" in str(cause):
        text = str(cause)
    # one line: OmegaConf puts the key and the schema's class on lines of their own
    key = re.search(r"full_key: (\S+)", text)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if key:
        written = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        below = [w for w in written if w.startswith(f"{key[1]}.")]
        if below:  # `checkpoint.every=10`: a value written as if it were a section
            keys = keys or _known_keys(compose(recipe))
            close = difflib.get_close_matches(below[0], [k for k in keys if k != key[1]], n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            return f"{below[0]}: {key[1]} is a single value, not a section with keys.{hint}"
        if "is not a subclass of" in first:  # `train=5`: a section written as if it were a value
            keys = keys or _known_keys(compose(recipe))
            inside = [k for k in keys if k.startswith(f"{key[1]}.")][:3]
            return f"{key[1]} is a section, not a value: set its keys, e.g. {', '.join(f'{k}=...' for k in inside)}"
    choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
    # inside a list of sections (data.sources=[{...}]) OmegaConf names only the inner key: say whose it is
    merging = re.search(r"Error merging override ([^=\s]+)=", str(error))
    where = f"{merging[1]}: " if key and merging and not key[1].startswith(merging[1]) else ""
    if key and choice:  # a value outside a closed vocabulary (tuner/choices.py)
        return f"{where}{key[1]}={choice[1]}: choose one of {choice[2]}"
    return f"{where}{key[1]}: {first}" if key and key[1] not in first else where + first
