"""The ``turbowan`` command: generate a video, check a machine, or run the built-in demo.

    turbowan generate --image cat.png --prompt "a cat surfing" --models-dir ComfyUI/models -o cat.mp4
    turbowan generate --prompt "a fox in snow" --models-dir ComfyUI/models -o fox.mp4     # text-to-video
    turbowan doctor --models-dir ComfyUI/models
    turbowan demo -o demo.mp4

A thin adapter over the `turbowan` package (loaders, `generate_i2v`, `write_video`): it finds the model
files, shows a progress bar per stage, and prints a one-line summary. Exit codes: 0 done, 2 bad input or a
model file that does not fit its slot (one line ``error: ...``), 130 interrupted (Ctrl-C), 143 / 129 stopped by
SIGTERM / SIGHUP (no partial file either way). When stderr is not a terminal (a log, a service) progress comes as
plain ``progress: ...`` lines, one per stage unit and one every few seconds while a unit runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .options import (ASPECT_RATIOS, ATTENTION_KINDS, EXECUTION_MODES, QUANT_MODES, RESOLUTIONS, VIDEO_FORMATS,
                      latent_tokens)
from .video import check_writable
from .model_files import MODEL_SLOTS, SLOTS_BY_KEY, missing_slot_error, resolve_model_files

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130
TICK_SECONDS = 5.0  # a running stage reports at least this often (plain lines; a bar's clock every second)
# the pipeline's parameter names as this command's options, for its refusals
OPTION_NAMES = {"num_frames": "--frames", "num_steps": "--steps", "seed": "--seed", "sigma_max": "--sigma-max",
                "boundary": "--boundary", "num_samples": "--samples"}
MAX_FPS = 240


# -- progress ---------------------------------------------------------------------------------------------

STAGE_LABELS = {"text": "text encode", "load": "load models", "encode": "VAE encode", "sample": "sampling",
                "decode": "VAE decode", "write": "write video"}


class StageProgress:
    """A tqdm bar per stage and the wall time of each stage; callable as the pipeline's progress hook.

    Each call ``(stage, done, total)`` charges the time since the previous call to ``stage``, so waits
    between stages (moving a model to the GPU) count towards the stage they precede. A ticker thread keeps a
    long unit (a 20 s step) visibly alive: it refreshes the bar's clock, or prints a plain line every
    ``TICK_SECONDS`` when stderr is not a terminal, where each finished unit also gets a line with its time.
    """

    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = enabled  # None: bars on a terminal, plain lines otherwise
        self.plain = enabled is None and not sys.stderr.isatty()
        self.times: dict[str, float] = {}
        self.written: list[Path] = []  # finished output files (kept if the run is interrupted later)
        self.bar = None
        self.stage: Optional[str] = None
        self._ticker: Optional[threading.Thread] = None
        self._stop_ticker = threading.Event()
        self.restart_clock()

    def restart_clock(self) -> None:
        self.last = time.perf_counter()
        self.last_wall = time.time()

    def begin(self, stage: str, total: int) -> None:
        """Show a stage's bar at 0 before slow work whose first unit takes long (loading the text encoder)."""
        self.close()
        self._open(stage, total)

    def __call__(self, stage: str, done: int, total: int) -> None:
        now, now_wall = time.perf_counter(), time.time()
        self.times[stage] = self.times.get(stage, 0.0) + (now - self.last)
        if self.bar is None or stage != self.stage or done <= self.bar.n:
            self.close()
            self._open(stage, total)
        self.done, self.total = done, total
        if self.plain:
            self._line(f"{self.label} {done}/{total} in {now - self.last:.1f} s "
                       f"(stage {self.times[stage]:.1f} s)")
        self.last, self.last_wall = now, now_wall
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()  # so the bar's clock stops with the stage

    def _open(self, stage: str, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=STAGE_LABELS.get(stage, stage), leave=True, file=sys.stderr,
                        disable=None if self.enabled is None else not self.enabled, dynamic_ncols=True,
                        bar_format="{desc:<12} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        self.bar.start_t = self.last_wall  # the stage began when the previous one ended
        self.stage, self.label, self.done, self.total = stage, STAGE_LABELS.get(stage, stage), 0, total
        if self.enabled is not False:
            self._stop_ticker.clear()
            self._ticker = threading.Thread(target=self._tick, name="turbowan-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        last_line = time.perf_counter()
        while not self._stop_ticker.wait(min(1.0, TICK_SECONDS)):
            bar = self.bar
            if bar is None:
                return
            if not self.plain:
                bar.refresh()  # redraws the elapsed time
            elif time.perf_counter() - max(last_line, self.last) >= TICK_SECONDS:
                last_line = time.perf_counter()
                self._line(f"{self.label} {self.done}/{self.total} running, {last_line - self.last:.0f} s "
                           "into this unit")

    @staticmethod
    def _line(text: str) -> None:
        print(f"progress: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._ticker is not None:
            self._stop_ticker.set()
            self._ticker.join()
            self._ticker = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self) -> str:
        parts = [f"{STAGE_LABELS.get(k, k)} {v:.1f} s" for k, v in self.times.items()]
        return f"{sum(self.times.values()):.1f} s ({', '.join(parts)})"


class _TqdmLogHandler(logging.Handler):
    """Library notices printed above the progress bars instead of through them."""

    def emit(self, record):
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


# -- generate ---------------------------------------------------------------------------------------------


def load_text_embedding_file(path):
    """--text-embedding: a saved [1, L, 4096] / [L, 4096] embedding, padded or cut to 512 rows."""
    from .pipeline import prepare_text_embedding, read_text_embedding

    return prepare_text_embedding(read_text_embedding(path))


def check_sla_topk(topk: float, frames: int, width: int, height: int) -> None:
    """Refuse, before any loading, an SLA ratio that keeps no key block for this clip size."""
    from .kernels.sla_contract import selected_block_count

    # raises ValueError naming the smallest ratio that works
    selected_block_count(topk, math.ceil(latent_tokens(frames, width, height) / 64))


def output_paths(output, samples: int) -> list[Path]:
    output = Path(output).expanduser()
    suffixes = [f".{fmt}" for fmt in VIDEO_FORMATS]
    if output.suffix.lower() not in suffixes:
        raise ValueError(f"-o {output.name}: the output must end in {', '.join(suffixes)}")
    if output.is_dir():
        raise ValueError(f"-o {str(output)!r} is a folder; give a file name such as {output / 'video.mp4'}")
    check_writable(output)
    if samples == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(samples)]


def lora_options(values: list[str]) -> list[tuple[Path, float]]:
    """--lora FILE[:STRENGTH] values -> (file, strength); each file checked now, before any model is loaded."""
    from .checkpoint import read_head

    out = []
    for value in values:
        path, _, strength = value.rpartition(":")
        try:
            out.append((Path(path), float(strength)))
        except ValueError:  # no strength given (or a colon inside the path)
            out.append((Path(value), 1.0))
        if not math.isfinite(out[-1][1]):
            raise ValueError(f"LoRA strength in {value!r} must be a finite number")
        read_head(out[-1][0].expanduser(), "a LoRA file (.safetensors)")  # missing, a folder, unreadable: one line
    return out


def _text_encoder_device(compute, encoder_path: Path):
    """Run the 11 GB umT5 on the GPU only when it fits next to nothing else; otherwise on the CPU (cached)."""
    import torch

    if compute.type != "cuda":
        return compute
    size = encoder_path.stat().st_size
    needed = size * (2 if "fp8" in encoder_path.name.lower() else 1) + (2 << 30)  # bf16 weights + headroom
    free, _ = torch.cuda.mem_get_info(compute)
    return compute if free > needed else torch.device("cpu")


def cmd_generate(args, progress: StageProgress) -> int:
    job = prepare_generate(args)
    context = encode_prompt(args, job, progress)
    if job["ranks"] > 1:
        return run_on_ranks(args, job, context, progress)
    return run_generate(args, job, context, job["device"], progress)


def prepare_generate(args) -> dict:
    """Step 1: everything that can be refused without loading a model; the run's files, sizes and outputs."""
    from .devices import check_gpu_count, pick_device, set_cpu_threads, warm_up_in_background
    from .pipeline import check_cpu_memory, check_run_options, open_image, target_size

    ranks = 1 if args.gpus is None else args.gpus
    ranks_on_cpu = os.environ.get(RANKS_ON_CPU) == "1"
    if args.gpus is not None:
        if args.gpus < 1 or not ranks_on_cpu:
            check_gpu_count(args.gpus)
        if args.gpus > 1 and args.device is not None:
            raise ValueError(f"--gpus {args.gpus} runs one process on each of cuda:0 to cuda:{args.gpus - 1}; leave "
                             "--device out (CUDA_VISIBLE_DEVICES picks the cards)")
    if args.split_vae and ranks < 2:
        raise ValueError("--split-vae shares the VAE out over the GPUs of a --gpus run; add --gpus 2 (or more), "
                         "or leave --split-vae out")
    t2v = args.image is None  # no first frame: text-to-video with a TurboWan2.1-T2V model
    if t2v:
        for given, option in ((args.ode, "--ode"), (args.adaptive, "--adaptive"), (args.boundary is not None,
                              "--boundary"), (args.lora_high or args.lora_low, "--lora-high/--lora-low")):
            if given:
                raise ValueError(f"{option} is an image-to-video option; give --image, or leave {option} out for "
                                 "text-to-video")
    # the reference scripts' defaults: T2V 480p and sigma_max 80, I2V 720p and sigma_max 200
    args.resolution = args.resolution or ("480p" if t2v else "720p")
    args.sigma_max = args.sigma_max if args.sigma_max is not None else (80.0 if t2v else 200.0)
    args.boundary = 0.9 if args.boundary is None else args.boundary
    check_run_options(args.frames, args.steps, args.seed, args.sigma_max, args.boundary, args.samples,
                      names=OPTION_NAMES)
    if not 0 <= args.quality <= 10:
        raise ValueError(f"--quality must be 0 to 10 (10 best), got {args.quality}")
    if not 0 < args.fps <= MAX_FPS:
        raise ValueError(f"--fps must be above 0 and at most {MAX_FPS} (the models were trained for 16), "
                         f"got {args.fps:g}")
    if args.text_embedding and args.prompt:
        raise ValueError("give --prompt (with a text encoder) or --text-embedding, not both")
    if not args.text_embedding and not args.prompt:
        raise ValueError("give --prompt TEXT (with --text-encoder or --models-dir), or --text-embedding FILE")
    files = resolve_model_files(args.models_dir, {slot.key: getattr(args, slot.key) for slot in MODEL_SLOTS},
                                required=("t2v", "vae") if t2v else ("high", "low", "vae"))
    if args.prompt and files["text_encoder"] is None:
        raise missing_slot_error(SLOTS_BY_KEY["text_encoder"])
    image = None if t2v else open_image(args.image, option="--image")
    width, height = target_size(image.size if image else (0, 0), args.resolution, args.aspect_ratio, args.adaptive,
                                args.width, args.height)
    if args.attention != "original":
        check_sla_topk(args.sla_topk, args.frames, width, height)
    outputs = output_paths(args.output, args.samples)
    loras = {"high": lora_options(args.lora + args.lora_high), "low": lora_options(args.lora + args.lora_low),
             "t2v": lora_options(args.lora)}
    slots = ("t2v",) if t2v else ("high", "low")
    if ranks > 1:
        check_heads_split(files, slots, ranks)
    device = pick_device("cpu" if ranks_on_cpu else args.device)
    if device.type == "cpu":
        from .checkpoint import DiTConfig

        # the release models' widths (the pipeline checks again with the loaded ones); a T2V file may be the 14B
        check_cpu_memory(DiTConfig(), args.frames, width, height, args.samples)
        set_cpu_threads()
    warm_up_in_background(device)  # CUDA context and Triton import, while the files are read
    return dict(ranks=ranks, t2v=t2v, files=files, image=image, width=width, height=height, outputs=outputs,
                loras=loras, slots=slots, device=device)


def check_heads_split(files: dict, slots, ranks: int) -> None:
    """--gpus N: refuse, before starting any process, models whose attention heads do not split over N ranks."""
    from .checkpoint import read_dit_checkpoint
    from .ops.sequence_parallel import check_world_size

    for slot in slots:
        heads = read_dit_checkpoint(files[slot]).config.num_heads  # memory-mapped: reads the header only
        try:
            check_world_size(heads, ranks)
        except ValueError as exc:
            raise ValueError(f"--gpus {ranks}: {exc}") from None


def encode_prompt(args, job: dict, progress: StageProgress):
    """Step 2: the text embedding (first, so the text encoder is gone before the experts arrive)."""
    import torch

    progress.restart_clock()
    progress.begin("text", 1)
    if args.text_embedding:
        context = load_text_embedding_file(args.text_embedding)
    else:
        from .text_cache import cached_text_embedding  # encodes once per prompt and encoder file

        context = cached_text_embedding(job["files"]["text_encoder"], args.prompt, tokenizer=args.tokenizer,
                                        device=_text_encoder_device(job["device"], job["files"]["text_encoder"]))
    progress("text", 1, 1)
    if job["ranks"] > 1 and job["device"].type == "cuda":
        torch.cuda.empty_cache()  # the ranks' processes need the card, not this one
    return context.cpu()


def run_generate(args, job: dict, context, device, progress: StageProgress, rank: int = 0, ranks: int = 1,
                 partial_list: Optional[Path] = None) -> int:
    """Steps 3 and 4: load the models, run the job, write the videos (rank 0 alone writes; every rank of a
    sequence-parallel run computes). ``partial_list``: where rank 0 notes its temporary video files, so that the
    process that started the ranks can remove them if this one is killed."""
    import torch

    import turbowan

    files, slots, outputs = job["files"], job["slots"], job["outputs"]
    # 3. models (kept on the CPU; the pipeline places them on the GPU per the execution mode). bf16 on the GPU
    # as the reference; float32 on a CPU, where bf16 convolutions and matmuls are slower, not faster.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    load_kwargs = dict(attention=args.attention, sla_topk=args.sla_topk, quant=args.quant, dtype=dtype)
    if getattr(args, "mode", None) is not None:
        load_kwargs["mode"] = args.mode
    experts = {}
    for i, slot in enumerate(slots):
        experts[slot] = turbowan.load_dit(files[slot], **load_kwargs)
        for path, strength in job["loras"][slot]:
            experts[slot] = turbowan.apply_lora(experts[slot], path, strength)
        progress("load", i + 1, len(slots) + 1)
    high = experts[slots[0]]
    vae = turbowan.load_vae(files["vae"], device="cpu", dtype=dtype)
    progress("load", len(slots) + 1, len(slots) + 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if device.type == "cpu" and high.config.dim >= 5120:
        logging.getLogger("turbowan").warning("turbowan: the 14B models take hours on a CPU; use a CUDA GPU")

    # 4. the job; each video is encoded while the VAE decodes (a writer thread per output), written to a
    # temporary name and renamed into place when complete
    from .video import VideoWriter

    writers = [VideoWriter(path, fps=args.fps, quality=args.quality) for path in outputs] if rank == 0 else []
    if partial_list is not None and writers:
        partial_list.write_text("".join(f"{w.temporary_path}\n" for w in writers))
    run = dict(num_frames=args.frames, num_steps=args.steps, resolution=args.resolution,
               aspect_ratio=args.aspect_ratio, width=args.width, height=args.height, sigma_max=args.sigma_max,
               seed=args.seed, num_samples=args.samples, progress=progress, device=device, return_frames=False,
               on_frames=(lambda i, start, chunk: writers[i].write(chunk)) if writers else None)
    if ranks > 1:
        run["sequence_parallel"] = True
        run["split_vae"] = args.split_vae
    try:
        if job["t2v"]:
            frames = turbowan.generate_t2v(high, vae, context, **run)
        else:
            frames = turbowan.generate_i2v(high, experts["low"], vae, job["image"], context,
                                           adaptive_resolution=args.adaptive, boundary=args.boundary, ode=args.ode,
                                           **run)
        for i, (writer, path) in enumerate(zip(writers, outputs)):
            if writer.frames_written == 0 and frames is not None:  # a pipeline that hands out no chunks
                writer.write(frames[i])
            writer.close()
            progress.written.append(path)
            progress("write", i + 1, len(outputs))
    except BaseException:
        for writer in writers:
            writer.abort()  # nothing once closed: finished videos are kept
        raise
    progress.close()
    if rank:
        return EXIT_OK

    peak = ""
    if device.type == "cuda":
        peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 1e9:.1f} GB allocated / "
                f"{torch.cuda.max_memory_reserved(device) / 1e9:.1f} GB reserved")
        if ranks > 1:
            peak += " on cuda:0"
    names = ", ".join(str(p) for p in outputs)
    n, w, h = args.frames, job["width"], job["height"]
    int8 = f", int8 {high.quant}" if high.quant else ""
    where = f"{ranks} {device.type} ranks" if ranks > 1 else str(device)
    print(f"wrote {names} ({n} frames, {w}x{h}, {args.fps:g} fps) on {where}{int8} in {progress.summary()}{peak}",
          flush=True)
    return EXIT_OK


# -- several GPUs: one process per rank ---------------------------------------------------------------------

RANKS_ON_CPU = "TURBOWAN_RANKS_ON_CPU"  # "1": --gpus N runs its N ranks on the CPU over gloo (tests, no GPU)
RANK_STOP_GRACE_S = 10.0  # after one rank ends badly, how long the others get to stop before they are killed


def run_on_ranks(args, job: dict, context, progress: StageProgress) -> int:
    """--gpus N: start N processes (one per card, NCCL; gloo on the CPU under TURBOWAN_RANKS_ON_CPU=1) that run
    the job sequence-parallel; rank 0 shows the progress and writes the videos. A rank that fails or is stopped
    ends them all; its exit status is this command's, and no partial video file is left."""
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    progress.close()
    ranks = job["ranks"]
    run_dir = Path(tempfile.mkdtemp(prefix="turbowan-ranks-"))
    context_mp = mp.start_processes(_rank_main, args=(ranks, str(run_dir), args, job, context), nprocs=ranks,
                                    join=False, start_method="spawn")
    try:
        try:
            while not context_mp.join(timeout=0.5, grace_period=RANK_STOP_GRACE_S):
                pass
            return EXIT_OK
        except mp.ProcessExitedException as exc:
            code = exc.exit_code if exc.exit_code >= 0 else 128 - exc.exit_code  # killed by a signal
            message = _rank_message(run_dir, ranks)
            if code == EXIT_USAGE and message:
                raise ValueError(message) from None  # printed as this command's one-line error
            if message:
                print(f"error: {message}", file=sys.stderr)
            return code
        except BaseException:  # Ctrl-C / SIGTERM here, or a rank's traceback (ProcessRaisedException)
            _stop_ranks(context_mp)
            raise
    finally:
        for line in (run_dir / "partial").read_text().split() if (run_dir / "partial").exists() else []:
            Path(line).unlink(missing_ok=True)  # a rank killed before it could abort its writer
        shutil.rmtree(run_dir, ignore_errors=True)


def _stop_ranks(context_mp) -> None:
    """Stop every rank still running (SIGTERM: each aborts its writer, also where SIGINT is ignored, as under
    nohup), and kill those that do not stop in time."""
    alive = [p for p in context_mp.processes if p.is_alive()]
    for process in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + RANK_STOP_GRACE_S
    for process in alive:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _rank_message(run_dir: Path, ranks: int) -> str:
    """The first rank's one-line error message (a rank writes one when it refuses or stops)."""
    for rank in range(ranks):
        path = run_dir / f"rank{rank}.message"
        if path.exists():
            return path.read_text().strip()
    return ""


def _rank_main(rank: int, ranks: int, run_dir: str, args, job: dict, context) -> None:
    """One rank of `run_on_ranks` (a spawned process): its device, the process group, the job; exits with the
    command's exit code."""
    import datetime

    import torch
    import torch.distributed as dist

    from .devices import set_cpu_threads

    run_dir = Path(run_dir)
    on_cpu = os.environ.get(RANKS_ON_CPU) == "1"
    if on_cpu:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # the ranks share the cores
            from .devices import cpu_count_available

            torch.set_num_threads(max(1, cpu_count_available() // ranks))
        else:
            set_cpu_threads()
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    progress = StageProgress(enabled=None if rank == 0 else False)
    code = EXIT_OK
    try:
        with _stop_signals_as_interrupts(), _library_notices(args.verbose and rank == 0):
            dist.init_process_group("gloo" if on_cpu else "nccl", init_method=f"file://{run_dir / 'store'}",
                                    rank=rank, world_size=ranks, timeout=datetime.timedelta(minutes=10),
                                    **({} if on_cpu else {"device_id": device}))
            try:
                code = run_generate(args, job, context, device, progress, rank=rank, ranks=ranks,
                                    partial_list=run_dir / "partial" if rank == 0 else None)
            finally:
                dist.destroy_process_group()
    except KeyboardInterrupt as exc:
        progress.close()
        code = 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except Exception as exc:
        progress.close()
        if not _is_user_error(exc):
            raise  # the traceback reaches the starting process
        (run_dir / f"rank{rank}.message").write_text(" ".join(str(exc).split()))
        code = EXIT_USAGE
    sys.exit(code)


# -- parser and entry point -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbowan", description="TurboWan2.2 image-to-video and TurboWan2.1 text-to-video (TurboDiffusion) "
                                     "without ComfyUI.", allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="print the library's notices (mode chosen, ...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,doctor,demo}")

    # allow_abbrev=False: "--mode" must never be taken for "--models-dir"
    g = sub.add_parser("generate", help="image + prompt (or prompt alone) -> video", allow_abbrev=False, description=(
        "Generate a video from an image and a prompt with the two TurboWan2.2-I2V-A14B experts, or, without "
        "--image, from a prompt alone with a TurboWan2.1-T2V model (--model). Model files come "
        "from the options or, by their usual names, from a ComfyUI models folder (--models-dir)."))
    g.add_argument("--image", help="the first frame (png, jpg, ...); without it: text-to-video with --model")
    g.add_argument("--prompt", help="what happens in the video")
    g.add_argument("--text-embedding", metavar="FILE",
                   help="a saved umT5 embedding (.safetensors, [1, L, 4096]) instead of --prompt")
    files = g.add_argument_group("model files (explicit paths win over --models-dir)")
    files.add_argument("--models-dir", metavar="DIR", help="ComfyUI models folder (diffusion_models/, vae/, "
                       "text_encoders/ or clip/), or one folder holding all the files")
    for slot in MODEL_SLOTS:
        files.add_argument(slot.option, dest=slot.key, metavar="FILE", help=f"{slot.what}, e.g. {slot.names[0]}")
    files.add_argument("--tokenizer", metavar="FILE",
                       help="spiece.model or tokenizer.json, for a text encoder file that does not embed one")
    lora = g.add_argument_group("LoRA (Wan2.2 LoRAs come as high/low pairs: one file per expert)")
    lora.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                      help="a LoRA for both experts (repeatable; strength default 1)")
    lora.add_argument("--lora-high", action="append", default=[], metavar="FILE[:STRENGTH]",
                      help="a LoRA for the high-noise expert only (repeatable)")
    lora.add_argument("--lora-low", action="append", default=[], metavar="FILE[:STRENGTH]",
                      help="a LoRA for the low-noise expert only (repeatable)")
    job = g.add_argument_group("video")
    job.add_argument("--frames", type=int, default=81, help="frame count, 4n+1 (default 81)")
    job.add_argument("--steps", type=int, default=4, help="sampling steps, 1-4 (default 4)")
    job.add_argument("--resolution", choices=list(RESOLUTIONS),
                     help="size preset (default 720p; text-to-video 480p)")
    job.add_argument("--aspect-ratio", default="16:9", choices=list(ASPECT_RATIOS), help="(default 16:9)")
    job.add_argument("--adaptive", action="store_true", help="keep the preset's area at the image's aspect ratio")
    job.add_argument("--width", type=int, help="explicit width (multiple of 16; with --height)")
    job.add_argument("--height", type=int, help="explicit height (multiple of 16; with --width)")
    job.add_argument("--seed", type=int, default=0)
    job.add_argument("--ode", action="store_true", help="deterministic ODE sampling (default: SDE, as recommended)")
    job.add_argument("--sigma-max", type=float, help="initial sigma of rCM (default 200; text-to-video 80)")
    job.add_argument("--boundary", type=float,
                     help="flow time where the low-noise expert takes over (default 0.9)")
    job.add_argument("--samples", type=int, default=1, help="videos from one run (-o name gets -1, -2, ...)")
    run = g.add_argument_group("how it runs")
    run.add_argument("--attention", default="sla", choices=list(ATTENTION_KINDS),
                     help="(default sla; sagesla_spargeattn needs SpargeAttn installed)")
    run.add_argument("--sla-topk", type=float, default=0.1, help="fraction of key blocks SLA keeps (default 0.1)")
    run.add_argument("--quant", default="auto", choices=list(QUANT_MODES),
                     help="how int8 weights run: dequantized (w8a16) or int8 x int8 (w8a8, the reference's numerics); "
                          "default auto: w8a8 where our int8 kernel runs, else w8a16")
    run.add_argument("--mode", default="auto", choices=list(EXECUTION_MODES),
                     help="where the expert weights live on CUDA (default auto; see `turbowan doctor`)")
    run.add_argument("--gpus", type=int, metavar="N",
                     help="CUDA GPUs to split the job over (sequence parallelism; at most the cards present)")
    run.add_argument("--split-vae", action="store_true",
                     help="with --gpus: a spatial tile of the VAE per GPU (faster; blended seams show)")
    run.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when present; bf16 on a GPU, "
                     "float32 on a CPU)")
    out = g.add_argument_group("output")
    out.add_argument("-o", "--output", default="out.mp4", help="mp4, webm or gif (default out.mp4)")
    out.add_argument("--fps", type=float, default=16)
    out.add_argument("--quality", type=int, default=8, help="0-10, 10 best (default 8)")

    d = sub.add_parser("doctor", help="what will work on this machine", allow_abbrev=False, description=(
        "Check the GPU, the libraries, which attention and int8 kernels work (each run on a tiny input and "
        "compared with the PyTorch path), the model files, and the largest video each execution mode should fit."))
    d.add_argument("--models-dir", metavar="DIR", help="ComfyUI models folder to check")
    d.add_argument("--device", help="CUDA device to check (default cuda:0)")

    m = sub.add_parser("demo", help="tiny random-weight run: does the install work?", allow_abbrev=False, description=(
        "Run the whole pipeline on tiny built-in random weights and write a short video, in seconds on a CPU. "
        "The video is noise-like by design: real videos need the released model files."))
    m.add_argument("-o", "--output", default="turbowan-demo.mp4", help="(default turbowan-demo.mp4)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--device", default="cpu", help="(default cpu)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt so the same cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_signals_as_interrupts():
    """While the command runs, SIGTERM and SIGHUP (where it exists) stop it the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return

    def stop(signum, frame):
        raise Terminated(signum)

    saved = {sig: signal.signal(sig, stop) for sig in (getattr(signal, n, None) for n in ("SIGTERM", "SIGHUP"))
             if sig is not None}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _library_notices(verbose: bool):
    """While the command runs, print the library's notices above the bars (and its INFO lines with -v)."""
    log = logging.getLogger("turbowan")
    saved = (log.level, log.propagate)
    handler = _TqdmLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.level, log.propagate = saved


def _run(args, progress: StageProgress) -> int:
    if args.command == "generate":
        return cmd_generate(args, progress)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(models_dir=args.models_dir, device=args.device)
    from .demo import run_demo

    return run_demo(args.output, seed=args.seed, device=args.device, progress=progress)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``turbowan`` and ``python -m turbowan``; returns the exit code."""
    progress = StageProgress()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        with _stop_signals_as_interrupts(), _library_notices(args.verbose):
            return _run(args, progress)
    except BrokenPipeError:  # output piped into a reader that stopped early (`turbowan doctor | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush does not fail too
        return EXIT_OK
    except KeyboardInterrupt as exc:
        progress.close()
        kept = f"; kept the finished {', '.join(map(str, progress.written))}" if progress.written else ""
        if isinstance(exc, Terminated):
            print(f"terminated by {signal.Signals(exc.signum).name}: stopped, no partial video file left{kept}",
                  file=sys.stderr)
            return 128 + exc.signum
        print(f"interrupted: stopped, no partial video file left{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        progress.close()
        if _is_user_error(exc):
            message = " ".join(str(exc).split())  # one line, whatever the library put in it
            print(f"error: {message}", file=sys.stderr)
            return EXIT_USAGE
        raise


def run_command(argv: Optional[list[str]] = None) -> None:
    """The ``turbowan`` command (entry point and ``python -m turbowan``): `main`, then exit with its status without
    the interpreter's teardown. Unloading torch and its CUDA context took 0.74 s on an H200 after the video was
    already complete (bench/user_path.py, ``cli_process_exit_s``); every file is written, closed and renamed and
    every rank process joined before `main` returns, so there is nothing left for the teardown to finish."""
    code = main(argv)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can reach the reader anyway
            stream.flush()
    logging.shutdown()
    os._exit(code)


def _is_user_error(exc: Exception) -> bool:
    """Bad input or a model file that does not fit (ModelFileError is a ValueError); also out of GPU memory."""
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return True
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        exc.args = (f"out of GPU memory ({str(exc).splitlines()[0]}); try --mode stream, a smaller --resolution or "
                    "fewer --frames (`turbowan doctor` estimates what fits)",)
        return True
    return False


if __name__ == "__main__":
    run_command()
