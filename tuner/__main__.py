"""``python -m tuner recipe=NAME key=value ...``: compose the config, check it, run the recipe's stages.

With no recipe it lists the recipes. Configuration errors (unknown key, wrong type, missing
folder) are reported before any model loads, naming the key, and exit with status 2.
"""

from __future__ import annotations

import os
import shlex
import sys

# nothing is ever fetched from a model hub; library chatter stays quiet unless asked for
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _hide_unused_integrations(cfg) -> None:
    """diffusers and peft import bitsandbytes as they start when it is installed (about 1 s and 50 MB here,
    with part of torch's compiler), though only train.optimizer=adamw8bit and model.quantize* use it: unless
    this run asks for it, they find it missing. (A module that is None in ``sys.modules`` counts as not
    installed.)"""
    from omegaconf import OmegaConf

    def select(key: str):  # an interpolation that does not resolve reads as None: validate() reports it
        return OmegaConf.select(cfg, key, throw_on_resolution_failure=False)

    wanted = (
        select("train.optimizer") == "adamw8bit" or select("model.quantize") or select("model.quantize_text_encoders")
    )
    if not wanted and "bitsandbytes" not in sys.modules:
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
    from tuner.errors import ConfigError, Interrupted

    if recipe is None or "-h" in argv or "--help" in argv:
        print("usage: python -m tuner [-m] recipe=NAME [key=value ...]")
        print("  -m: a sweep, one run per combination (adapter.rank=4,8,16 train.learning_rate=1e-4,1e-3),")
        print("      then a page comparing them")
        print("\nrecipes:")
        for name, line in list_recipes().items():
            print(f"  {name:<18} {line}")
        return 0 if recipe is None and not overrides else 2

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

    import signal

    from tuner.distributed import end, peer_failure
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
    except RuntimeError as e:  # a collective failed: another rank was killed, crashed or did not come in time
        told = peer_failure(e)
        if told is None:
            raise
        print(f"tuner: rank {rank}: {told}; exit 1", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # the machine, not the input: a full disk, a read-only or missing folder
        where = f"{e.filename}: " if e.filename else ""
        report(f"error: {where}{e.strerror or e}; what was written before is intact", e)
        return 1
    except Interrupted as e:  # a stage's Ctrl-C, after it listed what it made (generate's images)
        report(f"interrupted: {e}; exit 130", e)
        return 130
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
