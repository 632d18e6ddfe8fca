"""Memory-bank loss term: naive against two-pass against fused, forward+backward.

For each bank dtype, batch B, negatives K and loss (bank N x D, default ImageNet's N = 1,281,167
and D = 128) it times one loss term, loss.backward() included, three ways:
  naive     gather (B, K, D) with index_select, bmm, the loss formula, plain autograd (the
            reference; bank_loss(kernel='naive'))
  two-pass  bank_scores (the fused score kernel: gathers in the forward and again in the
            backward) followed by the loss formula on the (B, K) scores
  fused     bank_loss: one pass over the negatives gives the loss and its query gradient; the
            backward only scales the saved gradient
two-pass and fused use --kernel (auto: Triton on CUDA, chunked PyTorch on CPU).

What is counted (every row is written to --jsonl as soon as it is measured; a row that fails is
a row with its "error", and the next one runs):
  fwd_bwd_ms        median time of one forward+backward over --repeats runs (after one warm-up): on
                    CUDA the device's time between two CUDA events, L2 flushed before each run;
                    on the CPU the wall time
  samples_per_s     B * 1000 / fwd_bwd_ms (one loss term)
  speedup           naive's fwd_bwd_ms / this row's, same dtype, B, K and loss
  peak_extra_mib    the most bytes alive at once, beyond the inputs (bank, index, query,
                    positive rows), during one forward+backward: on CUDA
                    torch.cuda.max_memory_allocated minus the allocated bytes before; on CPU the
                    sum of the storages that operators create, tracked with a TorchDispatchMode
                    and freed when their storage dies (the CPU allocator keeps no statistics)
  memory_ratio      naive's peak_extra_mib / this row's
  gather_gb_per_s   bank bytes gathered (B*K*D*element size: once for naive and fused, twice
                    for two-pass) / fwd_bwd time. Index traffic (B*K*8 bytes) is not counted.
  frac_of_peak      (CUDA) gather_gb_per_s / the device's memory bandwidth peak: 2 x memory
                    clock x bus width from the device properties, or --peak-gb-per-s
  kernel_ms         (fused) the gather-and-reduce pass alone (the Triton kernel on CUDA), timed
                    like fwd_bwd_ms: no autograd, index check, combine or launch gaps
  kernel_gb_per_s   (fused) bytes the pass reads (bank rows B*K*D*element size + index B*K*8) / kernel_ms
  copy_gb_per_s     this device's measured copy bandwidth (read + written bytes of a --copy-mib
                    buffer copy / its time): the row "copy", and beside every fused row
  frac_of_copy      (fused) kernel_gb_per_s / copy_gb_per_s: how close the gather comes to what
                    the same card moves in a plain copy (the "hbm" target, pirl_fast/bench/targets.py)
  target            fused rows: "3x" when speedup >= 3, "10x mem" when memory_ratio >= 10 and,
                    on CUDA, "60% HBM" when frac_of_copy >= 0.6 (issue 12's targets); "-" none
"""

from __future__ import annotations

import math
import statistics
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pirl_fast.bench.record import Recorder
from pirl_fast.model.bank_kernels import bank_scores, resolve_kernel
from pirl_fast.model.bank_loss import _torch_partials, _triton_partials, bank_loss
from pirl_fast.model.loss import estimate_z, info_nce_loss, nce_loss
from pirl_fast.runtime.progress import progress

PEAK_GB_PER_S = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # vendor HBM peaks, if the properties lack them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PATHS = ("naive", "two-pass", "fused")
TEMPERATURE = 0.07  # the paper's tau
L2_FLUSH_BYTES = 256 * 2**20  # > the L2 of an H100 (50 MB) or H200 (60 MB): zeroed between timed CUDA runs


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256], help="batch sizes B")
    parser.add_argument("--negatives", type=int, nargs="+", default=[4096, 32000], help="negatives K per sample")
    parser.add_argument("--num-samples", type=int, default=1_281_167, help="bank rows N (ImageNet-1k train)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width D")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                        help="bank storage dtypes")
    parser.add_argument("--losses", nargs="+", default=["nce", "infonce"], choices=["nce", "infonce"],
                        help="loss kinds (the fused pass differs: per-row weights for nce, online softmax for infonce)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS,
                        help="implementations to compare (naive is the baseline of speedup and memory_ratio)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"],
                        help="kernel of two-pass and fused (auto = triton on CUDA, chunked torch on CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--copy-mib", type=int, default=1024 if torch.cuda.is_available() else 64,
                        help="buffer copied to measure the device's copy bandwidth (frac_of_copy; default 1024 "
                             "on CUDA, 64 on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-gb-per-s", type=float, default=None,
                        help="memory bandwidth peak for frac_of_peak (default: from the device's properties)")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of storage created by operators inside the block and alive at the same time."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self._existing = [t.untyped_storage() for t in existing]  # views of these are not new memory
        self._ids = {id(s) for s in self._existing}
        self.live = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self._ids.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                if id(storage) not in self._ids:
                    self._ids.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), storage.nbytes())
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Term:
    """One loss term's inputs and how to run it forward+backward along one path."""

    def __init__(self, bank, index, query, pos_rows, kind: str, num_data: int, z, path: str, kernel: str):
        self.bank, self.index, self.query, self.pos_rows = bank, index, query, pos_rows
        self.kind, self.num_data, self.z, self.path, self.kernel = kind, num_data, z, path, kernel

    def inputs(self) -> tuple:
        return self.bank, self.index, self.query, self.pos_rows, self.z

    def __call__(self) -> None:
        self.query.grad = None
        pos = (self.pos_rows * self.query).sum(1)  # (B,)
        if self.path == "two-pass":
            neg = bank_scores(self.query, self.bank, self.index, self.kernel)  # (B, K)
            if self.kind == "nce":
                loss = nce_loss(pos, neg, TEMPERATURE, self.num_data, self.z)
            else:
                loss = info_nce_loss(pos, neg, TEMPERATURE)
        else:
            kernel = "naive" if self.path == "naive" else self.kernel
            loss = bank_loss(self.query, pos, self.bank, self.index, self.kind, TEMPERATURE, self.num_data, self.z,
                             kernel).loss
        loss.backward()


def _peak_extra_bytes(term: Term) -> int:
    device = term.query.device
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        term()
        _sync(device)
        term.query.grad = None
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes(*term.inputs()) as counter:
        term()
        term.query.grad = None
    return counter.peak


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after one warm-up. On CUDA the device's own time
    between two CUDA events around each run (no host clock, no synchronisation inside the run), with
    L2 flushed before each run so that no run finds the last one's bank rows cached; on the CPU the
    wall time."""
    fn()  # warm-up: Triton compile, allocator caches
    times = []
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_gb_per_s(device: torch.device, nbytes: int, repeats: int) -> float:
    """Measured copy bandwidth of this device: a buffer of `nbytes` copied into another, bytes read plus
    written per second (GB/s). The ceiling a gather can approach on the same card."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def fused_kernel_ms(term: Term, repeats: int) -> tuple[float, int]:
    """(ms, bytes) of the fused path's gather-and-reduce pass alone (the Triton kernel on CUDA, the
    chunked torch pass on the CPU), without autograd, the index check or the combine: the part that
    reads the bank. Bytes: the gathered bank rows plus the (B, K) int64 index."""
    with torch.no_grad():
        q = term.query.detach().float() / TEMPERATURE
        l0 = (term.pos_rows * term.query.detach()).sum(1) / TEMPERATURE
        if term.kind == "nce":
            shift = torch.log(torch.as_tensor(term.z, dtype=torch.float32, device=q.device)) \
                + math.log(term.index.shape[1] / term.num_data)
        else:
            shift = torch.zeros((), device=q.device)
        partials = _triton_partials if term.kernel == "triton" else _torch_partials
        index = term.index.contiguous()
        ms = time_ms(lambda: partials(q, l0, term.bank, index, shift, term.kind == "nce"), q.device, repeats)
    b, k = index.shape
    return ms, b * k * (term.bank.shape[1] * term.bank.element_size() + index.element_size())


def peak_bandwidth(args, device: torch.device) -> float | None:
    """GB/s: --peak-gb-per-s, else 2 (DDR) x memory clock x bus width of the CUDA device, else by name."""
    if args.peak_gb_per_s is not None:
        return args.peak_gb_per_s
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return next((v for k, v in PEAK_GB_PER_S.items() if k in props.name), None)


def _target(row: dict, device: torch.device) -> str:
    met = []
    if row.get("speedup", 0) >= 3:
        met.append("3x")
    if row.get("memory_ratio", 0) >= 10:
        met.append("10x mem")
    if device.type == "cuda" and row.get("frac_of_copy", 0) >= 0.6:
        met.append("60% HBM")
    return ", ".join(met) or "-"


def run(args, rec: Recorder | None = None) -> list[dict]:
    """Every row, each measured under rec.guarded: a row that fails (out of memory, a kernel error) is a
    row with its error, and the next one still runs."""
    rec = rec or Recorder("membank")
    device = torch.device(args.device)
    if min(args.batch + args.negatives + [args.repeats, args.num_samples, args.dim]) < 1:
        raise ValueError("--batch, --negatives, --repeats, --num-samples and --dim must all be >= 1")
    kernel = resolve_kernel(args.kernel, device)
    peak_bw = peak_bandwidth(args, device)
    copy_bw = rec.guarded({"path": "copy", "bytes": args.copy_mib * 2**20},
                          lambda: {"copy_gb_per_s": copy_gb_per_s(device, args.copy_mib * 2**20, args.repeats)})
    copy_bw = copy_bw.get("copy_gb_per_s")
    gen = torch.Generator(device=device).manual_seed(0)
    bar = progress(total=len(args.dtypes) * len(args.batch) * len(args.negatives) * len(args.losses) * len(args.paths),
                   desc="membank", unit="row")
    for dtype_name in args.dtypes:
        bank = F.normalize(torch.randn(args.num_samples, args.dim, device=device, generator=gen), dim=1)
        bank = bank.to(DTYPES[dtype_name])  # (N, D)
        for b in args.batch:
            for k in args.negatives:
                index = torch.randint(args.num_samples, (b, k), device=device, generator=gen)  # (B, K)
                query = F.normalize(torch.randn(b, args.dim, device=device, generator=gen), dim=1).requires_grad_()
                pos_rows = bank[torch.randint(args.num_samples, (b,), device=device, generator=gen)].float()
                with torch.no_grad():  # Z as training estimates it on its first batch
                    z = estimate_z((pos_rows * query).sum(1), bank_scores(query, bank, index[:, :1024], kernel),
                                   TEMPERATURE, args.num_samples)
                for kind in args.losses:
                    base = None
                    for path in args.paths:
                        term = Term(bank, index, query, pos_rows, kind, args.num_samples, z, path, kernel)
                        description = {"path": path, "kernel": "naive" if path == "naive" else kernel, "loss": kind,
                                       "bank_dtype": dtype_name, "batch": b, "negatives": k}
                        row = rec.guarded(description,
                                          lambda term=term, base=base: measure_row(term, args, base, peak_bw, copy_bw))
                        if path == "naive" and "error" not in row:
                            base = (row["fwd_bwd_ms"], row["peak_extra_mib"] * 2**20)
                        bar.update(1)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()  # an out-of-memory row leaves nothing behind for the next
                del index, query, pos_rows
        del bank
    bar.close()
    return rec.rows


def measure_row(term: Term, args, base: tuple[float, int] | None, peak_bw: float | None,
                copy_bw: float | None) -> dict:
    """The figures of one path (see the module docstring); base: naive's (ms, peak bytes) if measured."""
    device = term.query.device
    term()  # first launch apart: Triton's compile and autotuning (its timing buffers) are not the path's memory
    peak = _peak_extra_bytes(term)
    ms = time_ms(term, device, args.repeats)
    b, k = term.index.shape
    row = {"fwd_bwd_ms": ms, "samples_per_s": b * 1e3 / ms, "peak_extra_mib": peak / 2**20}
    if base is not None and term.path != "naive":
        row.update(speedup=base[0] / ms, memory_ratio=base[1] / max(peak, 1))
    gathers = 2 if term.path == "two-pass" else 1
    row["gather_gb_per_s"] = gathers * b * k * args.dim * term.bank.element_size() / (ms * 1e-3) / 1e9
    if peak_bw:
        row.update(peak_gb_per_s=peak_bw, frac_of_peak=row["gather_gb_per_s"] / peak_bw)
    if term.path == "fused":
        kernel_ms, nbytes = fused_kernel_ms(term, args.repeats)
        row.update(kernel_ms=kernel_ms, kernel_bytes=nbytes, kernel_gb_per_s=nbytes / (kernel_ms * 1e-3) / 1e9)
        if copy_bw:
            row.update(copy_gb_per_s=copy_bw, frac_of_copy=row["kernel_gb_per_s"] / copy_bw)
        row["target"] = _target(row, device)
    return row
