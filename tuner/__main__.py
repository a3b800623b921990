"""``python -m tuner recipe=NAME key=value ...``: compose the config, check it, run the recipe's stages.

With no recipe it lists the recipes. Configuration errors (unknown key, wrong type, missing
folder) are reported before any model loads, naming the key, and exit with status 2.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys

# nothing is ever fetched from a model hub; library chatter stays quiet unless asked for
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _known_keys(cfg, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys():
        path = f"{prefix}{key}"
        node = cfg._get_node(key)
        keys += _known_keys(node, f"{path}.") if isinstance(node, DictConfig) else [path]
    return keys


def explain(error: Exception, recipe: str, overrides: list[str] = ()) -> str:
    """A config error as one readable message naming the key, with a suggestion where one fits."""
    from tuner.compose import compose

    text = str(error)
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
    return f"{key[1]}: {first}" if key and key[1] not in first else first


def _hide_unused_integrations(cfg) -> None:
    """diffusers and peft import bitsandbytes as they start when it is installed (about 1 s and 50 MB here,
    with part of torch's compiler), though only train.optimizer=adamw8bit uses it: unless this run asks for
    it, they find it missing. (A module that is None in ``sys.modules`` counts as not installed.)"""
    from omegaconf import OmegaConf

    # an interpolation that does not resolve reads as None here: validate() reports it, by its key
    optimizer = OmegaConf.select(cfg, "train.optimizer", throw_on_resolution_failure=False)
    if optimizer != "adamw8bit" and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


def cli() -> None:
    """The ``python -m tuner`` and ``tuner`` entry point: ``main``, then a quick exit.

    Python's own teardown of the torch, diffusers and transformers modules takes about 2 s on this machine
    and does nothing a run needs: by now every file is written (atomically) and closed, and the trackers are
    finished. So after the exit handlers run and the streams are flushed, the process ends at once.
    """
    import atexit

    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    argv = [a for a in argv if a not in ("-m", "--multirun")]
    recipe = next((a.split("=", 1)[1] for a in argv if a.startswith("recipe=")), None)
    overrides = [a for a in argv if not a.startswith("recipe=") and a != "print_config"]
    from tuner.compose import compose, list_recipes
    from tuner.errors import ConfigError

    if recipe is None or "-h" in argv or "--help" in argv:
        print("usage: python -m tuner [-m] recipe=NAME [key=value ...]")
        print("  -m: a sweep, one run per combination (adapter.rank=4,8,16 train.learning_rate=1e-4,1e-3),")
        print("      then a page comparing them")
        print("\nrecipes:")
        for name, line in list_recipes().items():
            print(f"  {name:<18} {line}")
        return 0 if recipe is None and not overrides else 2

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if multirun:
            from tuner.sweep import sweep

            sweep(recipe, overrides)
            return 0
        cfg = compose(recipe, overrides)
        if "print_config" in argv:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True))
            return 0
        _hide_unused_integrations(cfg)
        from tuner.checks import validate  # imports the stages (torch, diffusers): only for a run

        validate(cfg)
    except ConfigError as e:
        print(f"tuner: config error: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        print(f"tuner: config error: {explain(e, recipe, overrides)}", file=sys.stderr)
        return 2

    import signal

    from tuner.distributed import end
    from tuner.runner import run_recipe
    from tuner.training.checkpoints import SaveError, Stopped

    rank = int(os.environ.get("RANK", "0"))  # several processes: rank 0 speaks for all of them

    def report(message: str, error: Exception) -> None:
        if not getattr(error, "told_by_rank0", False):
            print(f"tuner: {f'rank {rank}: ' if rank else ''}{message}", file=sys.stderr, flush=True)

    try:
        run_recipe(cfg)
    except ConfigError as e:
        report(f"error: {e}", e)
        return 2
    except (FloatingPointError, SaveError) as e:
        report(f"training stopped: {e}", e)
        return 1
    except OSError as e:  # the machine, not the input: a full disk, a read-only or missing folder
        where = f"{e.filename}: " if e.filename else ""
        report(f"error: {where}{e.strerror or e}; what was written before is intact", e)
        return 1
    except Stopped as e:
        code = 130 if e.signum == signal.SIGINT else 0
        if rank:
            print(f"tuner: rank {rank}: {e}; exit {code}", file=sys.stderr, flush=True)
            return code
        run_dir = e.path.parent.parent
        kept = [a for a in argv if not a.startswith(("output_dir=", "resume=", "recipe="))]
        command = "python -m tuner " + shlex.join([f"recipe={recipe}", *kept, f"output_dir={run_dir}", "resume=auto"])
        world = os.environ.get("WORLD_SIZE", "1")
        launcher = f"\n(run by {world} processes: start them the same way, torchrun or accelerate launch)"
        many = world != "1"
        print(f"tuner: {'rank 0: ' if many else ''}{e}{f'; exit {code}' if many else ''}", file=sys.stderr)
        print(f"resume with:\n  {command}{launcher if many else ''}", file=sys.stderr, flush=True)
        return code
    finally:
        end()
    return 0


if __name__ == "__main__":
    cli()
