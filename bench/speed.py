"""Issue 17 benchmark: what onnxq costs next to onnxruntime's own quantizers, on the same samples in one run.

Every job is a separate process (``python -m onnxq ...`` or ``python bench/peer_jobs.py ...``) and is measured from
outside: CPU seconds = user + sys of the whole process tree (``os.wait4`` of the child), wall seconds, and peak
resident memory (the child's ``ru_maxrss``). The jobs alternate (peer, onnxq job, peer, next onnxq job, ...,
``--repeats`` rounds) so a change in the machine's load hits both tools alike; each ratio onnxq / peer is taken
between a job and the peer run just before it, then the median over the rounds. The 1-minute load average is
recorded before every run and printed beside the figures.

Jobs, on the same samples written once as arrays into a temporary folder that both tools read (image decoding
costs nothing to either):
  - CNNs (squeezenet1.1, mobilenet_v1_0.75_224, efficientnet_lite0; the first ``--samples`` images that
    ``--calib-size`` takes from imagenet-calib1000, in the order onnxq reads them): peer = onnxruntime's
    ``quant_pre_process`` + ``quantize_static`` (W8A8 QDQ, per channel, MinMax, QUInt8 activations, QInt8
    weights; batches of 16 as onnxq); onnxq ``default`` = ``--bits 4 --first-last-bits 8`` without ``--stats``,
    ``sequential`` = the same with ``--sequential``, ``budget`` = ``--avg-bits 3``.
  - all-MiniLM-L6-v2 (exported as bench/minilm.py does; the first ``--samples`` of its calibration sentences, one
    .npz per sentence at its own length, as a user's data comes, which onnxq pads into batches of 32): peers =
    onnxruntime's MatMul 4-bit quantizer, RTN and HQQ, block 32; onnxq ``default`` = ``--bits 4 --block-size 32``
    (COMQ, as bench/minilm.py), ``sequential`` = the same with ``--sequential``; no budget job.

COMQ's own time per layer (``--layer-times``, on by default): the statistics of one default run (``--stats``)
are read back and every layer is rounded again here as the default run rounds it (centred, shrunk Gram; one
BLAS thread, as in onnxq's worker processes), timed in CPU seconds; the slowest layers and the total are printed.

The physical limit of calibration (per model, once): the float model's forward time over the samples (one
onnxruntime session, the same batches) plus the Gram FLOPs (2 x rows x fan_in^2 x groups per layer, for onnxq's
own layer finder on its prepared model) at the machine's float32 GEMM rate (a large ``np.matmul`` with numpy's
threads, the ones onnxq's Gram products use). onnxq's calibration time is measured as a fresh default run that
writes ``--stats`` minus the same run reusing them (median of ``--repeats`` pairs). Writes
bench/results/<out>.json and .md.

    pip install -e '.[bench,peers]'
    python bench/speed.py [--models squeezenet1.1,...,minilm] [--jobs default,sequential,budget,peer]
                          [--samples 256] [--repeats 3] [--out speed]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
from common import MODELS, calib_arrays, model_path, require_shared, save_results
from minilm import BATCH as MINILM_BATCH
from minilm import CACHE as MINILM_CACHE
from minilm import EVAL_SIZE, cpu_name, export_float, feeds, sentences
from peer_jobs import ORDER_FILE
from threadpoolctl import threadpool_info

import onnxq
from onnxq import Layer, spread_order

MINILM = "minilm"
JOBS = ("default", "sequential", "budget", "peer")
ONNXQ_JOBS = JOBS[:-1]
IMAGE_BATCH = 16  # onnxq's --batch-size default; the peer's calibration reader and the forward timing use it too
DEFAULT_IMAGES = 256
PEERS_SCRIPT = Path(__file__).resolve().parent / "peer_jobs.py"
GEMM_SIZE = 2048


@dataclass
class Workload:
    """One model with its samples on disk, the onnxq flags of each job and the peer commands."""

    name: str
    model: Path
    samples: Path
    count: int
    batches: list[dict[str, np.ndarray]]
    onnxq: dict[str, list[str]]
    peers: dict[str, list[str]]  # label -> bench/peer_jobs.py arguments; "{out}" is the output path


@dataclass
class Run:
    """One measured child process."""

    model: str
    job: str
    repeat: int
    cpu_s: float
    wall_s: float
    rss_mb: float
    load: float
    extra: dict = field(default_factory=dict)


def write_samples(folder: Path, samples: list, suffix: str, save) -> None:
    """Write the samples so onnxq, which reads a folder's sorted files in spread order, reads sample i i-th;
    order.txt lists the same files in that order for the peer."""
    folder.mkdir(parents=True)
    positions = spread_order(len(samples))
    names = [f"{position:05d}{suffix}" for position in positions]
    for name, sample in zip(names, samples, strict=True):
        save(folder / name, sample)
    (folder / ORDER_FILE).write_text("\n".join(names) + "\n")


def onnxq_flags(model: Path, samples: Path, batch: int, fixed: list[str]) -> dict[str, list[str]]:
    """The CLI arguments of each onnxq job: all samples of the folder, no --stats."""
    common = [str(model), "--calib", str(samples), "--calib-size", "0", "--batch-size", str(batch), "-q"]
    return {"default": common + fixed, "sequential": common + fixed + ["--sequential"],
            "budget": common + ["--avg-bits", "3"]}


def cnn_workload(name: str, count: int, tmp: Path) -> Workload:
    """A shared CNN, its first ``count`` calibration images preprocessed once as .npy files."""
    arrays = calib_arrays(name, count)
    folder = tmp / name
    write_samples(folder, arrays, ".npy", lambda path, array: np.save(path, array))
    model = model_path(name)
    batches = [np.concatenate(arrays[i:i + IMAGE_BATCH]) for i in range(0, len(arrays), IMAGE_BATCH)]
    input_name = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    return Workload(name, model, folder, count, [{input_name: b} for b in batches],
                    onnxq_flags(model, folder, IMAGE_BATCH, ["--bits", "4", "--first-last-bits", "8"]),
                    {"quantize_static": ["static", str(model), str(folder), "{out}",
                                         "--batch-size", str(IMAGE_BATCH)]})


def minilm_workload(count: int, tmp: Path) -> Workload:
    """all-MiniLM-L6-v2 and the first ``count`` of bench/minilm.py's calibration sentences, one .npz per
    sentence (its own length: onnxq pads them into batches); the forward timing uses minilm.py's batches."""
    model = MINILM_CACHE / "fp32.onnx"
    if not model.exists():
        export_float(model)
    texts = sentences()[EVAL_SIZE:][:count]
    batches = feeds(texts, MINILM_BATCH)
    folder = tmp / MINILM
    write_samples(folder, feeds(texts, 1), ".npz", lambda path, feed: np.savez(path, **feed))
    jobs = onnxq_flags(model, folder, MINILM_BATCH, ["--bits", "4", "--block-size", "32"])
    del jobs["budget"]  # CLADO on a transformer is not what the peers are compared on (and takes long)
    return Workload(MINILM, model, folder, len(texts), batches, jobs,
                    {f"MatMul4 {algo.upper()}": ["matmul4", str(model), "{out}", "--algo", algo, "--block-size", "32"]
                     for algo in ("rtn", "hqq")})


LAUNCHER = """
import json, os, subprocess, sys, time
for line in sys.stdin:
    command, log = json.loads(line)
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    print(json.dumps([usage.ru_utime + usage.ru_stime, time.perf_counter() - start, usage.ru_maxrss,
                      os.waitstatus_to_exitcode(status)]), flush=True)
"""


class Launcher:
    """A small process that starts the jobs and reports each one's rusage. A child's peak RSS starts from its
    parent's (Linux keeps the larger of the two across fork and exec), and this benchmark grows as it runs
    (the tokenizer and torch for MiniLM, the forward passes of the calibration limit), so jobs started from it
    would all report its size; started from this launcher, a fresh small program, they report their own."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, command: list[str], log: Path) -> tuple[float, float, float, int]:
        """(CPU s of the job's process tree, wall s, peak RSS KB, exit code)."""
        self.process.stdin.write(json.dumps([command, str(log)]) + "\n")
        self.process.stdin.flush()
        cpu, wall, rss, code = json.loads(self.process.stdout.readline())
        return cpu, wall, rss, code


@cache
def launcher() -> Launcher:
    """The one job launcher of this process, started on first use: it is a fresh program, so whenever it starts,
    the jobs it starts do not inherit this process's size."""
    return Launcher()


def run_child(command: list[str], log: Path) -> tuple[float, float, float, float, str | None]:
    """Run a command as a child of the launcher: (CPU s of its process tree, wall s, peak RSS MB, load before,
    None) or, when it fails, the last line of its output in place of None."""
    load = os.getloadavg()[0]
    cpu, wall, rss, code = launcher().run(command, log)
    error = None
    if code:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        error = lines[-1][:200] if lines else "no output"
    return cpu, wall, rss / 1024, load, error


def measure(command: list[str], log: Path) -> tuple[float, float, float, float]:
    """``run_child``, stopping the benchmark with the command's last output lines when it fails."""
    cpu, wall, rss, load, error = run_child(command, log)
    if error is not None:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        sys.exit(f"{' '.join(command)} failed:\n{tail}")
    return cpu, wall, rss, load


def onnxq_command(args: list[str], out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "onnxq", *args, "-o", str(out), *extra]


def peer_command(args: list[str], out: Path) -> list[str]:
    return [sys.executable, str(PEERS_SCRIPT), *[str(out) if a == "{out}" else a for a in args]]


def run_job(work: Workload, job: str, repeat: int, command: list[str], tmp: Path) -> Run:
    """Measure one job, print its figures, and delete its output model."""
    cpu, wall, rss, load = measure(command, tmp / "job.log")
    run = Run(work.name, job, repeat, round(cpu, 2), round(wall, 2), round(rss, 1), round(load, 2))
    click.echo(f"{work.name} {job} #{repeat}: CPU {cpu:.1f} s, wall {wall:.1f} s, peak RSS {rss:.0f} MB "
               f"(load {load:.1f})")
    for path in tmp.glob("out*"):
        path.unlink()
    return run


def alternate(work: Workload, jobs: list[str], repeats: int, tmp: Path) -> list[Run]:
    """``repeats`` rounds; in each, every onnxq job runs right after the peers (or the peers alone)."""
    runs = []
    out = tmp / "out.onnx"
    chosen = [job for job in ONNXQ_JOBS if job in jobs and job in work.onnxq]
    for job in set(jobs) - set(work.onnxq) - {"peer"}:
        click.echo(f"{work.name}: no {job} job (not measured on this model)")
    with_peers = "peer" in jobs
    for repeat in range(repeats):
        for job in chosen or [None]:
            if with_peers:
                for label, args in work.peers.items():
                    run = run_job(work, label, repeat, peer_command(args, out), tmp)
                    run.extra["before"] = job
                    runs.append(run)
            if job:
                runs.append(run_job(work, job, repeat, onnxq_command(work.onnxq[job], out), tmp))
    return runs


def gemm_rate() -> float:
    """float32 FLOP/s of a large np.matmul (best of five), with numpy's own thread count."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_SIZE, GEMM_SIZE), dtype=np.float32) for _ in range(2))
    a @ b
    best = np.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * GEMM_SIZE**3 / best


def forward_seconds(model: Path, batches: list[dict[str, np.ndarray]]) -> float:
    """Wall time of one onnxruntime session (default threads, as onnxq's) running the float model over the
    batches, after one warm-up batch."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    session.run(None, batches[0])
    start = time.perf_counter()
    for feed in batches:
        session.run(None, feed)
    return time.perf_counter() - start


def layer_rows(layer: Layer, shape: tuple[int, ...], mask: np.ndarray | None) -> int:
    """Rows of the layer's unfolded input for one batch, from its output shape: output positions of a Conv,
    real tokens of a (batch, tokens, features) MatMul input under an attention mask, else all leading dims."""
    if layer.op_type == "Conv":
        return shape[0] * int(np.prod(shape[2:]))
    if mask is not None and len(shape) == 3 and tuple(shape[:2]) == mask.shape:
        return int((mask != 0).sum())
    return int(np.prod(shape[:-1]))


def gram_flops(model: Path, batches: list[dict[str, np.ndarray]]) -> tuple[float, int]:
    """FLOPs of onnxq's Gram products (2 x rows x fan_in^2 per group and layer) over the batches, and the layer
    count, for the layers onnxq's layer finder picks on its prepared model."""
    with onnxq.open_run(model, batches) as run:  # the prepared model and its layers; the data is not read here
        prepared, layers = run.model, run.layers
    produced = {node.name: node.output[0] for node in prepared.graph.node}
    names = [produced[layer.name] for layer in layers]
    del prepared.graph.output[:]
    prepared.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(prepared.SerializeToString(), options, providers=["CPUExecutionProvider"])
    total = 0.0
    for feed in batches:
        mask = feed.get("attention_mask")
        for layer, value in zip(layers, session.run(names, feed), strict=True):
            total += 2.0 * layer_rows(layer, value.shape, mask) * layer.fan_in**2 * layer.groups
    return total, len(layers)


def calibration_cost(work: Workload, repeats: int, tmp: Path) -> dict:
    """onnxq's calibration: a fresh default run writing --stats minus the same run reusing them (medians of
    ``repeats`` such pairs)."""
    stats, out = tmp / "stats.npz", tmp / "out.onnx"
    command = onnxq_command(work.onnxq["default"], out, ("--stats", str(stats)))
    pairs = []
    for _ in range(repeats):
        fresh = measure(command, tmp / "job.log")
        reused = measure(command, tmp / "job.log")
        pairs.append((fresh[0] - reused[0], fresh[1] - reused[1], (fresh[3] + reused[3]) / 2))
        stats.unlink()
        out.unlink()
    cpu, wall, load = (statistics.median(values) for values in zip(*pairs, strict=True))
    return {"calib_cpu_s": round(cpu, 2), "calib_wall_s": round(wall, 2), "calib_load": round(load, 2)}


def physical_limit(work: Workload, rate: float, repeats: int, tmp: Path) -> dict:
    """Issue 17 goal 4: the float forward pass plus the Gram FLOPs at the GEMM rate, against onnxq's calibration."""
    forward = forward_seconds(work.model, work.batches)
    flops, layers = gram_flops(work.model, work.batches)
    limit = {"model": work.name, "samples": work.count, "layers": layers, "forward_s": round(forward, 2),
             "gram_gflop": round(flops / 1e9, 2), "gemm_gflops": round(rate / 1e9, 1),
             "limit_s": round(forward + flops / rate, 2), **calibration_cost(work, repeats, tmp)}
    limit["calib_over_limit"] = round(limit["calib_wall_s"] / limit["limit_s"], 2)
    click.echo(f"{work.name} physical limit: {limit['limit_s']:.2f} s (forward {forward:.2f} s + "
               f"{limit['gram_gflop']:.1f} GFLOP at {limit['gemm_gflops']:.0f} GFLOP/s); onnxq calibration "
               f"{limit['calib_wall_s']:.2f} s wall, {limit['calib_cpu_s']:.2f} s CPU = "
               f"{limit['calib_over_limit']:.1f}x the limit (load {limit['calib_load']:.1f})")
    return limit


def comq_layer_times(work: Workload, tmp: Path, shown: int = 8) -> dict:
    """COMQ's CPU seconds per layer on the statistics of one default run, rounded as that run rounds them."""
    from threadpoolctl import threadpool_limits

    from onnxq.passes import Grid, comq

    flags = work.onnxq["default"]
    bits = int(flags[flags.index("--bits") + 1])
    block = int(flags[flags.index("--block-size") + 1]) if "--block-size" in flags else None
    first_last = int(flags[flags.index("--first-last-bits") + 1]) if "--first-last-bits" in flags else bits
    batch = int(flags[flags.index("--batch-size") + 1])
    config = onnxq.Config.from_options(bits=bits, calib_size=0, batch_size=batch)
    with onnxq.open_run(work.model, work.samples, config) as run:  # the default run's statistics, as it makes them
        stats = run.calibrate().layers
        layers, model = run.layers, run.model
    inits = {t.name: t for t in model.graph.initializer}
    times = []
    with threadpool_limits(1):
        for index, layer in enumerate(layers):
            W = layer.matrix(onnx.numpy_helper.to_array(inits[layer.weight])).astype(np.float64)
            H = stats[layer.name].centred_gram  # (a run also shrinks Grams of few rows: same cost)
            width = first_last if index in (0, len(layers) - 1) else bits
            grid = Grid(width, False, block if len(layer.shape) == 2 else None)
            start = time.process_time()
            comq.quantize(W, H, grid)
            times.append((time.process_time() - start, layer.name, "x".join(map(str, W.shape))))
    total = sum(t[0] for t in times)
    slowest = sorted(times, reverse=True)[:shown]
    click.echo(f"{work.name} COMQ: {total:.1f} CPU s over {len(times)} layers (one thread); slowest: "
               + ", ".join(f"{name} {shape} {sec:.2f} s" for sec, name, shape in slowest))
    return {"model": work.name, "total_s": round(total, 2), "layers": len(times),
            "per_layer": [{"layer": name, "shape": shape, "cpu_s": round(sec, 3)} for sec, name, shape in times]}


def median(runs: list[Run], key: str) -> float:
    return statistics.median(getattr(run, key) for run in runs)


def paired_rows(runs: list[Run], work: Workload) -> list[dict]:
    """One row per (onnxq job, peer): medians of both and the median of the paired ratios (the job over the peer
    run just before it, in the same round)."""
    rows = []
    for job in ONNXQ_JOBS:
        mine = [r for r in runs if r.job == job]
        if not mine:
            continue
        peers = work.peers if any(r.job in work.peers for r in runs) else {None: None}
        for label in peers:
            row = {"model": work.name, "job": job, "samples": work.count, "cpu_s": median(mine, "cpu_s"),
                   "wall_s": median(mine, "wall_s"), "rss_mb": median(mine, "rss_mb"),
                   "load": round(statistics.mean(r.load for r in mine), 2), "repeats": len(mine), "peer": label}
            if label is not None:
                theirs = [next(p for p in runs if p.job == label and p.repeat == r.repeat and p.extra["before"] == job)
                          for r in mine]
                row |= {"peer_cpu_s": median(theirs, "cpu_s"), "peer_wall_s": median(theirs, "wall_s"),
                        "peer_rss_mb": median(theirs, "rss_mb"),
                        "peer_load": round(statistics.mean(r.load for r in theirs), 2)}
                for key, ratio in (("cpu_s", "cpu_ratio"), ("wall_s", "wall_ratio"), ("rss_mb", "rss_ratio")):
                    row[ratio] = round(statistics.median(
                        getattr(m, key) / getattr(t, key) for m, t in zip(mine, theirs, strict=True)), 2)
            rows.append(row)
    default = [r for r in runs if r.job == "default"]
    for row in rows:
        if default and row["job"] != "default":
            row["cpu_vs_default"] = round(row["cpu_s"] / median(default, "cpu_s"), 2)
    return rows


def peer_only_rows(runs: list[Run], work: Workload) -> list[dict]:
    """With ``--jobs peer`` alone: the peers' medians."""
    return [{"model": work.name, "job": label, "samples": work.count, "cpu_s": median(mine, "cpu_s"),
             "wall_s": median(mine, "wall_s"), "rss_mb": median(mine, "rss_mb"),
             "load": round(statistics.mean(r.load for r in mine), 2), "repeats": len(mine), "peer": None}
            for label in work.peers if (mine := [r for r in runs if r.job == label])]


def machine() -> dict:
    """What the figures were measured on."""
    blas = sorted({f"{info.get('internal_api')} {info.get('num_threads')} threads" for info in threadpool_info()
                   if info.get("user_api") == "blas"})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "blas": ", ".join(blas), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "onnxq_commit": commit, "python": sys.version.split()[0]}


def markdown(rows: list[dict], limits: list[dict], info: dict, layer_times: list[dict]) -> str:
    lines = ["# onnxq vs onnxruntime's quantizers: cost on the same samples", "",
             f"{info['cpu']}, {info['cores']} cores, numpy BLAS {info['blas']}, onnxruntime {info['onnxruntime']}, "
             f"onnxq {info['onnxq_commit']}; load average {info['load_start']} at the start, {info['load_end']} at "
             "the end. CPU s = user + sys of the job's process tree; medians over the rounds; ratios = median of "
             "onnxq / the peer run just before it. Load = mean 1-minute load average before the runs.", "",
             "| model | onnxq job | samples | onnxq CPU s (wall) | peak RSS MB | load | peer | peer CPU s (wall) "
             "| peer RSS MB | peer load | CPU ratio | wall ratio | RSS ratio | CPU vs default |",
             "|---" * 14 + "|"]
    for r in rows:
        peer = (f"{r['peer']} | {r['peer_cpu_s']:.1f} ({r['peer_wall_s']:.1f}) | {r['peer_rss_mb']:.0f} | "
                f"{r['peer_load']:.1f} | {r['cpu_ratio']:.2f}x | {r['wall_ratio']:.2f}x | {r['rss_ratio']:.2f}x"
                if r.get("peer") else "– | – | – | – | – | – | –")
        versus = f"{r['cpu_vs_default']:.2f}x" if "cpu_vs_default" in r else "–"
        lines.append(f"| {r['model']} | {r['job']} | {r['samples']} | {r['cpu_s']:.1f} ({r['wall_s']:.1f}) | "
                     f"{r['rss_mb']:.0f} | {r['load']:.1f} | {peer} | {versus} |")
    if limits:
        lines += ["", "Calibration against its physical limit (float forward pass over the samples + Gram FLOPs at "
                  "the measured float32 GEMM rate); onnxq's calibration = a fresh default run writing --stats minus "
                  "the same run reusing them (median of --repeats pairs).", "",
                  "| model | samples | layers | forward s | Gram GFLOP | GEMM GFLOP/s | limit s | onnxq calibration "
                  "wall s (CPU s) | wall / limit | load |", "|---" * 10 + "|"]
        for m in limits:
            lines.append(f"| {m['model']} | {m['samples']} | {m['layers']} | {m['forward_s']:.2f} | "
                         f"{m['gram_gflop']:.1f} | {m['gemm_gflops']:.0f} | {m['limit_s']:.2f} | "
                         f"{m['calib_wall_s']:.2f} ({m['calib_cpu_s']:.2f}) | {m['calib_over_limit']:.1f}x | "
                         f"{m['calib_load']:.1f} |")
    for m in layer_times:
        lines += ["", f"COMQ on {m['model']}: {m['total_s']:.1f} CPU s over {m['layers']} layers (one BLAS thread, "
                  "the default run's statistics); slowest layers:", "", "| layer | weight (out x in) | CPU s |",
                  "|---|---|---|"]
        lines += [f"| {t['layer']} | {t['shape']} | {t['cpu_s']:.2f} |"
                  for t in sorted(m["per_layer"], key=lambda t: -t["cpu_s"])[:8]]
    return "\n".join(lines) + "\n"


def parse_list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    chosen = [item for item in text.replace(" ", "").split(",") if item]
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise click.BadParameter(f"{flag} takes a comma-separated subset of {','.join(allowed)} (not {unknown})")
    return chosen


@click.command()
@click.option("--models", default=",".join([*MODELS, MINILM]), show_default=True)
@click.option("--jobs", default=",".join(JOBS), show_default=True)
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_IMAGES, show_default=True,
              help="Calibration samples: images, or MiniLM sentences (bench/minilm.py's calibration set has 656).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--limit/--no-limit", default=True, show_default=True,
              help="Also measure the physical limit of calibration and onnxq's calibration time (needs default).")
@click.option("--layer-times/--no-layer-times", default=True, show_default=True,
              help="Also time COMQ per layer on one default run's statistics (needs default).")
@click.option("--out", default="speed", show_default=True, help="Results tag: bench/results/<out>.json and .md.")
def main(models: str, jobs: str, samples: int, repeats: int, limit: bool, layer_times: bool, out: str) -> None:
    """Alternate onnxruntime's quantizers and onnxq on the same samples; CPU, wall, peak RSS and their ratios."""
    require_shared()
    names = parse_list(models, (*MODELS, MINILM), "--models")
    chosen = parse_list(jobs, JOBS, "--jobs")
    info = {**machine(), "load_start": round(os.getloadavg()[0], 2)}
    rate = gemm_rate() if limit and "default" in chosen else None
    rows, limits, runs, comq_times = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="onnxq-speed-") as folder:
        tmp = Path(folder)
        for name in names:
            work = minilm_workload(samples, tmp) if name == MINILM else cnn_workload(name, samples, tmp)
            measured = alternate(work, chosen, repeats, tmp)
            runs += measured
            rows += paired_rows(measured, work) or peer_only_rows(measured, work)
            if rate is not None:
                limits.append(physical_limit(work, rate, repeats, tmp))
            if layer_times and "default" in chosen:
                comq_times.append(comq_layer_times(work, tmp))
    info["load_end"] = round(os.getloadavg()[0], 2)
    table = markdown(rows, limits, info, comq_times)
    save_results(out, {}, rows, table, {"limits": limits, "machine": info, "runs": [asdict(r) for r in runs],
                                        "comq_layer_times": comq_times,
                                        "gemm_gflops": round(rate / 1e9, 1) if rate else None})
    click.echo(table)
    click.echo(json.dumps(info))


if __name__ == "__main__":
    main()
