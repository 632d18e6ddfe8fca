"""Memory-bank negative scores: naive gather+bmm against the fused kernel, forward+backward.

For each bank dtype, batch B and negatives K (bank N x D, default ImageNet's N = 1,281,167 and
D = 128) it times scores = bank_scores(q, bank, index) plus scores.backward(grad) and measures
the peak extra memory of that forward+backward.

What is counted:
  fwd_bwd_ms        median wall time of one forward+backward over --repeats runs (after one
                    warm-up; CUDA runs are synchronised before the clock stops)
  fwd_bwd_per_s     1000 / fwd_bwd_ms; samples_per_s = B * fwd_bwd_per_s (one loss term)
  peak_extra_mib    the most bytes alive at once, beyond the inputs (bank, index, query, grad),
                    during one forward+backward: on CUDA torch.cuda.max_memory_allocated minus
                    the allocated bytes before; on CPU the sum of the storages that operators
                    create, tracked with a TorchDispatchMode and freed when their storage dies
                    (the CPU allocator keeps no statistics). Includes the (B, K) scores and grads.
  gather_gb_per_s   (CUDA) bank bytes the gather must read: B*K*D*elem_size for the forward
                    plus the same for the backward, divided by fwd_bwd time (index, score and
                    grad traffic, 2*B*K*(8+4) bytes, is not counted)
  frac_of_peak      gather_gb_per_s / the HBM peak in --peak-gb-per-s (default by GPU name:
                    H200 4800, H100 SXM 3350, A100 80GB 2039 GB/s)
"""

from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pirl_fast.bank_kernels import bank_scores, resolve_kernel
from pirl_fast.progress import progress

PEAK_GB_PER_S = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # vendor HBM peaks (SXM parts)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256], help="batch sizes B")
    parser.add_argument("--negatives", type=int, nargs="+", default=[4096, 32000], help="negatives K per sample")
    parser.add_argument("--num-samples", type=int, default=1_281_167, help="bank rows N (ImageNet-1k train)")
    parser.add_argument("--dim", type=int, default=128, help="embedding width D")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES),
                        help="bank storage dtypes")
    parser.add_argument("--kernels", nargs="+", default=["naive", "auto"],
                        choices=["naive", "auto", "torch", "triton"],
                        help="kernels to compare (auto = triton on CUDA, chunked torch on CPU)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per row (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-gb-per-s", type=float, default=None,
                        help="memory bandwidth peak for frac_of_peak (default: by GPU name)")


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


def _fwd_bwd(query, bank, index, grad, kernel) -> None:
    query.grad = None
    bank_scores(query, bank, index, kernel).backward(grad)


def _peak_extra_bytes(query, bank, index, grad, kernel) -> int:
    device = query.device
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _fwd_bwd(query, bank, index, grad, kernel)
        _sync(device)
        query.grad = None
        return torch.cuda.max_memory_allocated(device) - base
    with LiveBytes(query, bank, index, grad) as counter:
        _fwd_bwd(query, bank, index, grad, kernel)
        query.grad = None
    return counter.peak


def _time_ms(query, bank, index, grad, kernel, repeats: int) -> float:
    _fwd_bwd(query, bank, index, grad, kernel)  # warm-up: Triton compile, allocator caches
    times = []
    for _ in range(repeats):
        _sync(query.device)
        start = time.perf_counter()
        _fwd_bwd(query, bank, index, grad, kernel)
        _sync(query.device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _peak_bandwidth(args, device: torch.device) -> float | None:
    if args.peak_gb_per_s is not None:
        return args.peak_gb_per_s
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_GB_PER_S.items() if k in name), None)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    if min(args.batch + args.negatives + [args.repeats, args.num_samples, args.dim]) < 1:
        raise ValueError("--batch, --negatives, --repeats, --num-samples and --dim must all be >= 1")
    peak_bw = _peak_bandwidth(args, device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    bar = progress(total=len(args.dtypes) * len(args.batch) * len(args.negatives) * len(args.kernels),
                   desc="membank", unit="row")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        bank = torch.nn.functional.normalize(
            torch.randn(args.num_samples, args.dim, device=device, generator=gen), dim=1).to(dtype)  # (N, D)
        for b in args.batch:
            for k in args.negatives:
                index = torch.randint(args.num_samples, (b, k), device=device, generator=gen)  # (B, K)
                query = torch.randn(b, args.dim, device=device, generator=gen).requires_grad_()  # (B, D)
                grad = torch.randn(b, k, device=device, generator=gen)  # (B, K) upstream gradient
                baseline_ms = None
                for kernel in args.kernels:
                    row = {"kernel": resolve_kernel(kernel, device) if kernel == "auto" else kernel,
                           "bank_dtype": dtype_name, "batch": b, "negatives": k}
                    try:
                        peak = _peak_extra_bytes(query, bank, index, grad, kernel)
                        ms = _time_ms(query, bank, index, grad, kernel, args.repeats)
                    except torch.OutOfMemoryError:
                        row["status"] = "out of memory"
                        rows.append(row)
                        bar.update(1)
                        continue
                    row.update(fwd_bwd_ms=ms, fwd_bwd_per_s=1e3 / ms, samples_per_s=b * 1e3 / ms,
                               peak_extra_mib=peak / 2**20)
                    if kernel == "naive":
                        baseline_ms = ms
                    elif baseline_ms is not None:
                        row["speedup_vs_naive"] = baseline_ms / ms
                    if device.type == "cuda":
                        gathered = 2 * b * k * args.dim * bank.element_size()  # forward + backward gather
                        row["gather_gb_per_s"] = gathered / (ms * 1e-3) / 1e9
                        if peak_bw:
                            row["frac_of_peak"] = row["gather_gb_per_s"] / peak_bw
                    rows.append(row)
                    bar.update(1)
                del index, query, grad
        del bank
    bar.close()
    return rows
