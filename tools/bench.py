"""Time a tuner recipe on a tiny model, optionally beside a reference trainer on the same model and data.

    python tools/bench.py                                          # tuner alone, one run
    python tools/bench.py --reference PATH/train_dreambooth_lora.py --repeats 3
    python tools/bench.py --family flux2 --reference PATH/train_dreambooth_lora_flux2.py --target 1.5

The model is a randomly initialised SD1.x pipeline with SD1.5's block structure (``tiny.SIZES["bench"]``,
64 px), or with ``--family`` that family's tiny pipeline (its ``build_tiny``; a transformer's at 256 px, with
its ``TINY_OPTIONS``); the data is ``--images`` handwritten digits from scikit-learn at that size. Both programs
train a LoRA of the same rank on the same attention layers, at the same batch size, learning rate and number of
steps, and save the adapter; the reference gets the flags that match tuner's run where its script declares them
(``matching_flags``: float32, prompt length, text-encoder layers, latents cached before the loop unless
``--reference-encodes``). Runs are interleaved (tuner, reference, tuner, ...) and the table gives medians:

    wall              process start to exit, start-up and saving included
    first step        process start to the end of the first training step
    steps/s, samples/s  the steady rate, from the progress bar: after the first fifth of the steps to the last
    samples/CPU-s     the same steps' samples per second of CPU time the process tree used (user + system,
                      read when the bar moves): with ``OMP_NUM_THREADS=1`` it moves far less than the wall
                      rate when other processes share the CPU (20% here, where the wall rate halved)
    peak RSS          the process tree's largest resident memory (sampled every 20 ms, and the kernel's peak)
    phases            tuner's share of step time per phase (from its summary.json)

The reference's progress bar is read from its output (a tqdm bar whose total is the step count, by default
the one named ``Steps``); its other numbers come from the outside, as tuner's do. With a reference, the last
line is the steady ratio against its target (``STEADY_TARGET``), so a slower step shows as MISSED.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from tuner.models import family_names, get_family

ROOT = Path(__file__).resolve().parent.parent
# the default resolution for a family whose tiny pipeline is a transformer (Flux.2, Qwen-Image: 16 wide): at 64 px
# its 16 image tokens make a step mostly Python overhead, not the denoiser
TRANSFORMER_RESOLUTION = 256
BAR = re.compile(r"(?P<desc>[^\r\n|]*?):?\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+) \[")


def make_model(work: Path, family: str) -> Path:
    """``family``'s tiny pipeline, built once in ``work``: SD1.5's block structure at bench widths for the SD1.x
    shapes (``tiny.SIZES["bench"]``), a family's own tiny shape otherwise (where it has one size only)."""
    from tuner.models.tiny import make_tiny_pipeline

    model = work / ("model" if family == family_names()[0] else f"model-{family}")
    if not (model / "model_index.json").is_file():
        try:
            make_tiny_pipeline(model, size="bench", family=family)
        except KeyError:  # a family whose variants are not SIZES'
            make_tiny_pipeline(model, family=family)
    return model


def make_images(work: Path, images: int, resolution: int) -> Path:
    """``images`` digit images (one digit, so a class) at ``resolution`` px, written once in ``work``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = work / f"images-{images}-{resolution}"
    if not data.is_dir():
        digits = load_digits()
        picked = digits.images[digits.target == 3][:images]
        data.mkdir(parents=True)
        for i, array in enumerate(picked):
            gray = (255 - array / 16 * 255).astype(np.uint8)
            image = Image.fromarray(gray).resize((resolution, resolution), Image.Resampling.BICUBIC)
            image.convert("RGB").save(data / f"{i:03d}.png")
    return data


def measure(command: list[str], bar_name: str, steps: int, env: dict, log: Path) -> dict:
    """Run ``command``; return its wall time, first-step time, steady rate and peak RSS."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = 0
    done = threading.Event()

    def sample_rss() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def cpu_seconds() -> float:  # the process tree's CPU time so far (user + system)
        total = 0.0
        try:
            root = psutil.Process(process.pid)
            for p in [root, *root.children(recursive=True)]:
                times = p.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
        return total

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    seen: dict[int, float] = {}  # progress-bar count -> when it was first printed
    cpu: dict[int, float] = {}  # progress-bar count -> the CPU seconds used by then
    output = []
    pending = b""
    while chunk := process.stdout.read1(65536):
        now = time.perf_counter() - start
        output.append(chunk)
        pieces = re.split(rb"[\r\n]", pending + chunk)
        pending = pieces.pop()
        for piece in pieces:
            match = BAR.search(piece.decode(errors="replace"))
            if match and bar_name and int(match["total"]) == steps and re.search(bar_name, match["desc"]):
                if int(match["n"]) not in seen:
                    seen[int(match["n"])], cpu[int(match["n"])] = now, cpu_seconds()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    log.write_bytes(b"".join(output))
    if status != 0:
        raise RuntimeError(f"exit status {status >> 8}: {shlex.join(command)}\n(output: {log})")
    peak = max(peak, usage.ru_maxrss * 1024)  # the kernel's peak of the main process
    nan = float("nan")
    if bar_name is None:  # no training: the import floor
        return {"wall": wall, "first_step": nan, "steps_per_s": nan, "steps_per_cpu_s": nan, "peak_rss": peak}
    counts = sorted(n for n in seen if n >= 1)
    if not counts:
        raise RuntimeError(f"no progress bar matching {bar_name!r} with total {steps} in the output ({log})")
    after = [n for n in counts if n >= max(1, steps // 5)]
    first, last = after[0], counts[-1]
    rate = (last - first) / (seen[last] - seen[first]) if last > first else nan
    used = cpu[last] - cpu[first]
    per_cpu = (last - first) / used if last > first and used > 0 else nan
    result = {"wall": wall, "first_step": seen[counts[0]], "steps_per_s": rate, "steps_per_cpu_s": per_cpu}
    return result | {"peak_rss": peak}


def tuner_command(args, model: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "tuner", f"recipe={args.recipe}", f"model={args.family}", f"model.path={model}",
        f"data.instance_dir={data}", f"data.instance_prompt={args.prompt}", f"data.resolution={args.resolution}",
        "prior.enabled=false", "stages=[base,prepare,train,export]", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}", f"train.learning_rate={args.lr}", f"adapter.rank={args.rank}",
        f"adapter.alpha={args.rank}", "adapter.targets=attn", "export.formats=[diffusers]",
        f"train.log_every={max(1, args.steps // 5)}", "validation.every=0", f"output_dir={out}",
        *get_family(args.family).TINY_OPTIONS, *args.tuner_args,
    ]  # fmt: skip


def reference_command(args, model: Path, data: Path, out: Path) -> list[str]:
    return [
        args.reference_python, str(args.reference), f"--pretrained_model_name_or_path={model}",
        f"--instance_data_dir={data}", f"--instance_prompt={args.prompt}", f"--resolution={args.resolution}",
        f"--train_batch_size={args.batch}", f"--max_train_steps={args.steps}", f"--learning_rate={args.lr}",
        f"--rank={args.rank}", f"--output_dir={out}", "--seed=0", *matching_flags(args), *args.reference_args,
    ]  # fmt: skip


def matching_flags(args) -> list[str]:
    """Flags that make the reference do what tuner's run does, those of them its script declares: float32 (tuner's
    precision on CPU; also the SD1.5 script's default), the family's tiny prompt length (its TINY_OPTIONS), the text
    encoder layers its pipeline reads (its TAPS: the klein script's default is dev's 10 20 30, past the tiny Qwen3's
    28 layers), latents encoded once before the loop (tuner caches them; diffusers' Flux.2 and Qwen-Image scripts
    have --cache_latents, the SD1.5 one has not; --reference-encodes drops it). --reference-args win."""
    family = get_family(args.family)
    declared = set(re.findall(r"[\"'](--[a-z_]+)[\"']", args.reference.read_text()))
    given = {a.split("=")[0] for a in args.reference_args}
    flags = {"--mixed_precision": ["no"]} | ({} if args.reference_encodes else {"--cache_latents": []})
    if getattr(family, "TAPS", ()):
        flags["--text_encoder_out_layers"] = [str(t) for t in family.TAPS]
    for option in family.TINY_OPTIONS:  # model.max_sequence_length=N -> --max_sequence_length=N
        key, _, value = option.partition("=")
        flags[f"--{key.removeprefix('model.')}"] = [value]
    wanted = [(k, v) for k, v in flags.items() if k in declared and k not in given]
    return [a for k, values in wanted for a in (k, *values)]


def as_the_reference_reads_it(script: Path, model: Path) -> None:
    """Give the tiny folder what the reference's loader asks of it and the real checkpoint has: FLUX.2-dev's
    tokenizer folder is a PixtralProcessor (the script calls PixtralProcessor.from_pretrained and the pipeline
    checks the class); the tiny one saves the bare tokenizer. tuner reads either (its Flux.2 load_tokenizer)."""
    import json

    if "PixtralProcessor.from_pretrained" not in script.read_text():
        return
    index = json.loads((model / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    (model / "model_index.json").write_text(json.dumps(index, indent=2))
    config = {"image_processor_type": "PixtralImageProcessor", "patch_size": {"height": 16, "width": 16}}
    (model / "tokenizer" / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


# what both programs import before they can train: the floor under their wall time and memory (it ends
# without Python's module teardown, which is not a must: tuner skips it, the reference does not)
FLOOR = (
    "import torch, accelerate, peft, transformers; from diffusers import AutoencoderKL, UNet2DConditionModel; "
    "from transformers import CLIPTextModel; import os; os._exit(0)"
)


def floor_command(args, model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", FLOOR]


def phases(run_dir: Path) -> dict[str, float]:
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["metrics"].get("step_phases", {})


# the steady rate against the reference that a change must keep (issue #36: measured 1.94x once, then 1.72x, 1.75x)
STEADY_TARGET = 1.9


def ratio_of(median: dict[str, dict], key: str) -> float:
    tuner, reference = median["tuner"][key], median["reference"][key]
    return tuner / reference if reference else float("nan")


def table(results: dict[str, list[dict]], batch: int, targets: dict[str, tuple[str, float]]) -> str:
    """Medians per program; with a reference, tuner / reference and the target; with the import floor, the
    same ratio for what lies above it (wall and memory the programs themselves add)."""
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    for m in median.values():
        m["samples_per_s"], m["samples_per_cpu_s"] = m["steps_per_s"] * batch, m["steps_per_cpu_s"] * batch
    rows = [
        ("wall (s)", "wall", "{:.1f}"),
        ("first step (s)", "first_step", "{:.1f}"),
        ("steady steps/s", "steps_per_s", "{:.2f}"),
        ("steady samples/s", "samples_per_s", "{:.1f}"),
        ("steady samples/CPU-s", "samples_per_cpu_s", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss", "{:.0f}"),
    ]
    compare = "reference" in median
    floor = median.get("imports only")
    head = ["metric", *median] + (["tuner / reference", "target"] if compare else [])
    head += ["above the floor: tuner / reference"] if compare and floor else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, fmt in rows:
        scale = 1 / 2**20 if key == "peak_rss" else 1
        cells = [label, *("" if m[key] != m[key] else fmt.format(m[key] * scale) for m in median.values())]
        if compare:
            ratio = ratio_of(median, key)
            want = targets.get(key)
            met = want is not None and (ratio >= want[1] if want[0] == ">=" else ratio <= want[1])
            cells += [f"{ratio:.2f}x", "" if want is None else f"{want[0]} {want[1]}x {'ok' if met else 'MISSED'}"]
            if floor:
                above = floor[key] == floor[key] and key in ("wall", "peak_rss")
                tuner, reference = median["tuner"][key], median["reference"][key]
                cells += [f"{(tuner - floor[key]) / (reference - floor[key]):.2f}x" if above else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=8, help="instance images (a multiple of --batch is fair)")
    parser.add_argument("--family", default=family_names()[0], choices=family_names(), help="whose tiny pipeline")
    parser.add_argument("--resolution", type=int, help=f"px (64; {TRANSFORMER_RESOLUTION} for transformers)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--recipe", default="dreambooth_lora")
    parser.add_argument("--prompt", default="a photo of sks digit")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tuner-bench")
    parser.add_argument("--reference", type=Path, help="another trainer's script, run with the same inputs")
    parser.add_argument("--reference-python", default=sys.executable, help="the Python that runs --reference")
    parser.add_argument("--reference-bar", default=r"^Steps", help="regex: the desc of its training progress bar")
    parser.add_argument("--reference-args", nargs="*", default=[], help="more arguments for the reference")
    parser.add_argument("--target", type=float, default=STEADY_TARGET, help="steady ratio to meet (issue #37: 1.5)")
    parser.add_argument("--reference-encodes", action="store_true", help="no --cache_latents for the reference")
    parser.add_argument("--tuner-args", nargs="*", default=[], help="more key=value overrides for tuner")
    parser.add_argument("--floor", action="store_true", help="also time a process that only imports the libraries")
    args = parser.parse_args()
    if args.images % args.batch:
        print(f"note: {args.images} images at batch {args.batch}: some batches of an epoch are partial", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work, args.family)
    if args.resolution is None:  # the U-Net bench shape is for 64 px; the transformers' tiny widths want more pixels
        args.resolution = 64 if (model / "unet").is_dir() else TRANSFORMER_RESOLUTION
    data = make_images(args.work, args.images, args.resolution)
    if args.reference:
        as_the_reference_reads_it(args.reference, model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNER_HOME": str(args.work / "home")}
    programs = {"tuner": (tuner_command, r"^train")}
    if args.reference:
        programs["reference"] = (reference_command, args.reference_bar)
    if args.floor:
        programs["imports only"] = (floor_command, None)
    results: dict[str, list[dict]] = {name: [] for name in programs}
    tuner_phases = []
    for repeat in range(args.repeats):
        for name, (command_of, bar) in programs.items():
            out = args.work / "runs" / f"{name}-{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            command = command_of(args, model, data, out)
            if repeat == 0:
                print(f"{name}: {shlex.join(command)}", flush=True)
            result = measure(command, bar, args.steps, env, args.work / f"{name}-{repeat}.log")
            results[name].append(result)
            if name == "tuner":
                tuner_phases.append(phases(out))
            if name == "imports only":
                print(f"  imports only: wall {result['wall']:.1f} s, peak {result['peak_rss'] / 2**20:.0f} MiB")
                continue
            print(
                f"  {name} run {repeat + 1}/{args.repeats}: wall {result['wall']:.1f} s, "
                f"{result['steps_per_s']:.2f} steps/s ({result['steps_per_cpu_s']:.2f} per CPU second), "
                f"peak {result['peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
    steady = (">=", args.target)
    targets = {"steps_per_s": steady, "samples_per_s": steady, "samples_per_cpu_s": steady}
    targets |= {"wall": ("<=", 0.6), "peak_rss": ("<=", 0.8)}
    print(f"\n{args.steps} steps, batch {args.batch}, {args.images} images at {args.resolution} px, "
          f"LoRA rank {args.rank}; medians of {args.repeats} interleaved run(s)\n")  # fmt: skip
    print(table(results, args.batch, targets))
    if tuner_phases and tuner_phases[0]:
        keys = ["data", "vae", "text_encoder", "forward", "backward", "optimizer"]
        shares = {k: statistics.median(p.get(k, 0.0) for p in tuner_phases) for k in keys}
        shares["other"] = max(0.0, 1 - sum(shares.values()))
        print("\ntuner, share of step time: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
        print("(vae and text_encoder are 0 when their outputs are cached before the loop, the default)")
    if args.reference:
        print("\n" + steady_line(results, args.target))


def steady_line(results: dict[str, list[dict]], target: float = STEADY_TARGET) -> str:
    """The steady rate against the reference in one line, per wall second and per CPU second, against the target."""
    median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    ratios = {"wall": ratio_of(median, "steps_per_s"), "CPU": ratio_of(median, "steps_per_cpu_s")}
    said = [f"{r:.2f}x per {clock} second ({'ok' if r >= target else 'MISSED'})" for clock, r in ratios.items()]
    return f"steady samples/s, tuner / reference (target >= {target}x): " + ", ".join(said)


if __name__ == "__main__":
    main()
