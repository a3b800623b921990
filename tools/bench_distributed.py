"""Benchmark data-parallel training: samples/s with 1 and 2 (or more) processes, the all-reduce per step, and
(DDP against FSDP2) the trained state each process holds.

    python tools/bench_distributed.py                      # 1 and 2 processes, 40 steps, batch 4 each, 3 runs
    python tools/bench_distributed.py --procs 1 2 4 --steps 60 --batch 2 --size sd15 --resolution 64
    python tools/bench_distributed.py --adapter full --strategies ddp fsdp   # a full fine-tune: DDP and FSDP2

Each case starts ``torchrun --nproc_per_node N`` on this script's worker, which builds a tiny pipeline
of the real classes (SD1.5's block structure by default), puts a LoRA on its U-Net (or, ``--adapter full``,
trains all of it) and trains it with tuner's own loop (``Training``, DistributedDataParallel through
accelerate, or FSDP2 with ``fsdp`` among ``--strategies``: gloo on CPUs, NCCL on GPUs) on random
latents. Per process the batch is ``--batch``, so N processes train N times the samples per step. The
table gives, after ``--warmup`` steps:

    step ms          median wall time of one optimizer step
    samples/s        global batch / step time
    all-reduce ms    one all-reduce of the trained gradients (same size and dtype), timed alone (DDP)
    state MB         the trained weights, their gradients and AdamW's two moments this process holds
    peak RSS MB      the process's peak resident memory (rank 0)
    speed-up         samples/s over the first case's

On a machine with fewer cores than processes times threads the processes share the cores: the
speed-up there measures the overhead, not the scaling a machine with one GPU per process gets.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(args) -> None:
    import torch
    from peft import LoraConfig
    from torch.distributed.tensor import DTensor

    from tuner import distributed
    from tuner.config import TrainConfig
    from tuner.models import get_family
    from tuner.models.tiny import make_tiny_pipeline
    from tuner.training.batches import Batch
    from tuner.training.loop import Training
    from tuner.training.sharding import Sharded

    accelerator = distributed.make_accelerator("no", 1)
    folder = Path(args.tmp) / "pipe"
    if accelerator.is_main_process and not (folder / "model_index.json").exists():
        make_tiny_pipeline(folder, size=args.size)
    distributed.barrier(accelerator)
    sd15 = get_family("sd15")
    c = sd15.load(folder)
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False).to(accelerator.device)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    if args.adapter == "lora":
        c.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets))
    else:
        c.unet.requires_grad_(True)
    latent = args.resolution // 8
    world = accelerator.num_processes
    embeds = sd15.encode_prompts(c, ["a photo"])
    stamps = []

    def next_batch(generator):
        stamps.append(time.perf_counter())
        n = args.batch * world  # the global batch: every rank draws it, each trains its slice
        latents = torch.randn(n, 4, latent, latent, generator=generator)
        return Batch(latents, embeds.cpu().expand(n, -1, -1), torch.full((n,), 1.0 / n))

    t = TrainConfig(max_steps=args.steps, learning_rate=1e-4, log_every=args.steps)
    shard = None
    if args.strategy == "fsdp" and world > 1:
        main = accelerator.is_main_process
        shard = lambda modules: Sharded(modules, {"denoiser": sd15.OFFLOAD_BLOCKS}, "no", True, main)  # noqa: E731
    training = Training(accelerator, c.unet, c.unet.parameters(), sd15.objective(c), next_batch, t, 0, shard=shard)
    training.train()
    steps = [b - a for a, b in zip(stamps, stamps[1:])][args.warmup :]
    local = [p.to_local() if isinstance(p, DTensor) else p for p in training.params]
    state_mb = sum(p.numel() for p in local) * 4 * 4 / 1e6  # fp32 weights, gradients, exp_avg, exp_avg_sq
    grads = torch.zeros(sum(p.numel() for p in training.params), device=accelerator.device)
    reduce_ms = 0.0
    if world > 1 and args.strategy == "ddp":
        for _ in range(3):
            torch.distributed.all_reduce(grads)
        if grads.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            torch.distributed.all_reduce(grads)
        if grads.is_cuda:
            torch.cuda.synchronize()
        reduce_ms = (time.perf_counter() - start) / 20 * 1000
    if accelerator.is_main_process:
        step = statistics.median(steps)
        row = {
            "strategy": args.strategy,
            "procs": world,
            "state_mb": state_mb,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_ms": step * 1000,
            "samples_per_s": args.batch * world / step,
            "allreduce_ms": reduce_ms,
            "grad_mb": grads.numel() * 4 / 1e6,
            "device": str(accelerator.device),
        }
        Path(args.out).write_text(json.dumps(row))
    # the DDP wrapper goes before the process group: its reducer destroyed after the group can hang in gloo
    del training
    gc.collect()
    distributed.end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="per process")
    parser.add_argument("--size", default="sd15", help="tiny pipeline size (tuner/models/tiny.py)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapter", choices=["lora", "full"], default="lora")
    parser.add_argument("--strategies", nargs="+", choices=["ddp", "fsdp"], default=["ddp"], help="fsdp: 2+ procs")
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case, interleaved; the median is shown")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cases = [(s, n) for s in args.strategies for n in args.procs if s == "ddp" or n > 1]
    runs: dict[tuple[str, int], list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, n in [case for _ in range(args.repeat) for case in cases]:  # interleaved: drift hits all alike
            out = Path(tmp) / f"{strategy}-{n}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       __file__, "--worker", f"--tmp={tmp}", f"--out={out}", f"--steps={args.steps}",
                       f"--warmup={args.warmup}", f"--batch={args.batch}", f"--size={args.size}",
                       f"--resolution={args.resolution}", f"--rank={args.rank}", f"--adapter={args.adapter}",
                       f"--strategy={strategy}"]  # fmt: skip
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                sys.exit(f"{strategy} x {n} failed:\n{done.stderr[-3000:]}")
            runs[strategy, n].append(json.loads(out.read_text()))
    rows = []
    for results in runs.values():  # the run of median samples/s of each case
        rows.append(sorted(results, key=lambda r: r["samples_per_s"])[len(results) // 2])
    base = rows[0]["samples_per_s"]
    trained = f"LoRA r{args.rank}" if args.adapter == "lora" else "every weight (full)"
    print(f"tiny {args.size} U-Net, {trained}, {args.resolution} px, batch {args.batch} per process, "
          f"{args.steps} steps ({args.warmup} warm-up), median of {args.repeat} interleaved runs, "
          f"{rows[0]['device']}, {os.cpu_count()} cores")  # fmt: skip
    print(f"{'strategy':>8}  {'processes':>9}  {'step ms':>8}  {'samples/s':>9}  {'all-reduce ms':>13}  "
          f"{'state MB':>8}  {'peak RSS MB':>11}  {'speed-up':>8}")  # fmt: skip
    for r in rows:
        reduce = f"{r['allreduce_ms']:.2f}" if r["strategy"] == "ddp" and r["procs"] > 1 else "-"
        print(f"{r['strategy']:>8}  {r['procs']:>9}  {r['step_ms']:>8.1f}  {r['samples_per_s']:>9.1f}  {reduce:>13}  "
              f"{r['state_mb']:>8.2f}  {r['rss_mb']:>11.0f}  {r['samples_per_s'] / base:>7.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
