"""Memory-bank kernels: negative scores without the (B, K, D) tensor, and the fused bank update.

bank_scores(query, bank, index) -> scores[b, k] = <query[b], bank[index[b, k]]>      # (B, K)

Materialised naively the gathered rows cost B*K*D floats per loss term (B=256, K=32000,
D=128: 4.2 GB in fp32, kept again for backward). The fused versions gather and reduce on the
fly, in the forward (scores) and the backward (grad_query[b] = sum_k grad[b,k] * bank[index[b,k]]),
and are differentiable with respect to `query` only (the bank is a buffer, updated by momentum).

kernel:
  triton  Triton kernels, compiled, on CUDA tensors; or run by Triton's interpreter on CPU tensors
          in a process that imported triton with TRITON_INTERPRET=1 (how the CPU tests run them).
          Triton reads that variable once, at import, and then interprets or compiles every
          kernel of the process, its own library (tl.sum, tl.max) included: one process never
          mixes the two (see `interpreted`; tests/conftest.py decides it for the test suite).
          Extra memory: the (B, K) scores and a (B, splits, D) fp32 partial sum.
  torch   chunked PyTorch over K: extra memory O(B * chunk * D), chunk = CHUNK_ELEMENTS // (B*D).
  naive   index_select + bmm, plain autograd: the reference and the benchmark's baseline.
  auto    triton on CUDA tensors, torch on CPU tensors.
The bank may be float32 or bfloat16; products are accumulated in float32; scores are float32.

The update (gather rows, blend, normalise, scatter) lives here too: `bank_update`, one Triton
program per gathered row, with a PyTorch fallback computing the same formula (see its docstring
for the duplicate rule). The fused loss term (scores, loss and query gradient in one pass) is
in pirl_fast.model.bank_loss and shares the helpers here (kernel choice, index check, gather, split-K).
"""

import inspect
import os

import torch
from torch import Tensor

try:  # optional at the edge: the package imports and the torch paths run without Triton
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - triton ships with the CUDA torch wheels
    triton = tl = InterpretedFunction = JITFunction = None

KERNELS = ("auto", "triton", "torch", "naive")
CHUNK_ELEMENTS = 1 << 20  # torch path: at most 1M gathered elements (4 MB fp32, cache-sized) alive at once
BLOCK_K = 64  # bank rows per Triton program step: 64 x 128 x 2 B = 16 KB of bf16 in flight per program
# Split-K grids (B, splits): about PROGRAMS_PER_SM programs per SM in all. The split-K kernels
# take 20-26K of an SM's 64K registers per program (4 warps x ~110, or 8 warps x ~100 for the
# fused loss; tests/test_kernel_compile.py reads them), so 2-4 programs are resident per SM and
# 8 per SM makes 2-4 waves, enough to even out the tail.
PROGRAMS_PER_SM = 8
INTERPRETER_SMS = 2  # CPU tensors (Triton's interpreter): a few splits, so tests run the split-K code


def interpreted() -> bool:
    """Whether this process runs Triton's interpreter (triton imported with TRITON_INTERPRET=1)."""
    return triton is not None and isinstance(tl.sum, InterpretedFunction)  # Triton's own @jit functions follow it


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; unknown names and impossible choices raise, saying why."""
    if kernel not in KERNELS:
        raise ValueError(f"bank kernel={kernel!r} is unknown; choose one of {KERNELS}")
    if kernel == "auto":
        kernel = "triton" if device.type == "cuda" and triton is not None else "torch"
    if kernel == "triton":
        if triton is None:
            raise RuntimeError("kernel='triton' needs the triton package; install it or use kernel='torch'")
        if device.type == "cuda" and interpreted():
            raise RuntimeError("kernel='triton' on CUDA tensors, but triton was imported with TRITON_INTERPRET=1, "
                               "which makes it interpret every kernel of the process: unset TRITON_INTERPRET, or "
                               "use kernel='torch'")
        if device.type != "cuda" and not interpreted():
            raise RuntimeError(f"kernel='triton' got {device.type} tensors: use CUDA tensors, or set "
                               "TRITON_INTERPRET=1 before triton is first imported to run the kernels in "
                               "Triton's interpreter on the CPU")
    return kernel


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached by torch, no sync); INTERPRETER_SMS for CPU tensors."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def split_k(b: int, k: int, device: torch.device) -> tuple[int, int]:
    """(splits, k_per_split) for a (B, splits) grid of about PROGRAMS_PER_SM programs per SM.

    Every split holds a whole number of BLOCK_K blocks and at least one index:
    splits = ceil(K / k_per_split).
    """
    sms = sm_count(device)
    blocks = triton.cdiv(k, BLOCK_K)
    splits = min(blocks, max(1, triton.cdiv(sms * PROGRAMS_PER_SM, b)))
    k_per_split = BLOCK_K * triton.cdiv(blocks, splits)
    return triton.cdiv(k, k_per_split), k_per_split


def check_index(index: Tensor, num_rows: int) -> None:
    """Raise if any index is outside [0, num_rows): one fused min/max, asynchronous on CUDA (no host sync)."""
    if index.dtype != torch.int64:
        raise TypeError(f"bank indices must be int64, got {index.dtype}")
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    msg = f"bank index out of range: every index must lie in [0, {num_rows}) (the bank's row count)"
    if index.device.type == "cuda":
        torch._assert_async((lo >= 0) & (hi < num_rows), msg)  # device-side assert, no sync
    elif lo < 0 or hi >= num_rows:
        raise IndexError(f"{msg}; got min {int(lo)}, max {int(hi)}")


def check_shapes(query: Tensor, bank: Tensor, index: Tensor) -> None:
    if query.dim() != 2 or bank.dim() != 2 or index.dim() != 2:
        raise ValueError(f"expected query (B, D), bank (N, D), index (B, K); got {tuple(query.shape)}, "
                         f"{tuple(bank.shape)}, {tuple(index.shape)}")
    if query.shape[1] != bank.shape[1] or query.shape[0] != index.shape[0]:
        raise ValueError(f"shape mismatch: query {tuple(query.shape)}, bank {tuple(bank.shape)}, index "
                         f"{tuple(index.shape)}; need query (B, D), bank (N, D), index (B, K)")
    if not (query.device == bank.device == index.device):
        raise ValueError(f"query, bank and index must share a device; got {query.device}, {bank.device}, "
                         f"{index.device}")
    if index.shape[1] < 1:
        raise ValueError("need at least one negative per sample (K >= 1)")


def bank_scores(query: Tensor, bank: Tensor, index: Tensor, kernel: str = "auto") -> Tensor:
    """Scores <query[b], bank[index[b, k]]>: query (B,D), bank (N,D), index (B,K) int64 -> (B,K) float32."""
    check_shapes(query, bank, index)
    check_index(index, bank.shape[0])
    kernel = resolve_kernel(kernel, query.device)
    bank = bank.detach()  # gradients flow to the query only
    with torch.autocast(device_type=query.device.type, enabled=False):  # fp32 accumulation, whatever the context
        if kernel == "naive":
            return naive_scores(query, bank, index)
        if kernel == "torch":
            return _ChunkedScores.apply(query, bank, index)
        return _TritonScores.apply(query, bank, index)


def naive_scores(query: Tensor, bank: Tensor, index: Tensor) -> Tensor:
    """The reference: materialise the (B, K, D) rows, then one batched matrix-vector product."""
    b, k = index.shape
    rows = bank.index_select(0, index.reshape(-1)).view(b, k, -1).float()  # (B, K, D)
    return torch.bmm(rows, query.float().unsqueeze(2)).squeeze(2)  # (B, K)


def gather_rows(bank: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """bank rows for index (B, c) -> (B, c, D) float32, written into the flat float32 buffer `out`.

    index_select on a flat index beats bank[index] ~3x on CPU; one buffer reused for every chunk
    saves an allocation (and its page faults) per chunk.
    """
    b, c = index.shape
    flat = index.reshape(-1)  # (B*c,)
    rows = out[:flat.numel() * bank.shape[1]].view(flat.numel(), bank.shape[1])  # (B*c, D)
    if bank.dtype == torch.float32:
        torch.index_select(bank, 0, flat, out=rows)
    else:
        rows.copy_(bank.index_select(0, flat))  # bf16 -> float32
    return rows.view(b, c, -1)


def chunk_size(b: int, d: int) -> int:
    """Negatives per chunk of the torch paths: B * chunk * D <= CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // (b * d))


class _ChunkedScores(torch.autograd.Function):
    """PyTorch over K-chunks: gathers at most (B, chunk, D) at a time, forward and backward."""

    @staticmethod
    def forward(ctx, query: Tensor, bank: Tensor, index: Tensor) -> Tensor:
        b, k = index.shape
        q = query.float().unsqueeze(1)  # (B, 1, D)
        out = torch.empty(b, k, device=query.device, dtype=torch.float32)  # (B, K)
        step = chunk_size(b, query.shape[1])
        buf = torch.empty(b * min(step, k) * bank.shape[1], device=query.device)  # one chunk of rows
        for k0 in range(0, k, step):
            rows = gather_rows(bank, index[:, k0:k0 + step], buf)  # (B, c, D) float32
            # (B,1,D) @ (B,D,c): on CPU ~8x faster than the equal (B,c,D) @ (B,D,1) batched mat-vec
            out[:, k0:k0 + step] = torch.bmm(q, rows.transpose(1, 2)).squeeze(1)
        ctx.save_for_backward(bank, index)
        ctx.query_dtype = query.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, index = ctx.saved_tensors
        b, k = index.shape
        grad = grad.float()
        grad_q = torch.zeros(b, 1, bank.shape[1], device=grad.device, dtype=torch.float32)  # (B, 1, D)
        step = chunk_size(b, bank.shape[1])
        buf = torch.empty(b * min(step, k) * bank.shape[1], device=grad.device)  # one chunk of rows
        for k0 in range(0, k, step):
            rows = gather_rows(bank, index[:, k0:k0 + step], buf)  # (B, c, D), again: nothing (B,K,D) was kept
            grad_q.baddbmm_(grad[:, k0:k0 + step].unsqueeze(1), rows)
        return grad_q.squeeze(1).to(ctx.query_dtype), None, None


# ---------------------------------------------------------------------------------- Triton

if triton is not None:
    # All tensors are contiguous (the wrappers make sure), so strides are implied: row r of the bank
    # starts at r * D. D is a compile-time constant (128 in practice): with BLOCK_D == D the column
    # mask folds away and each bank row is read with 16-byte vector loads.

    def _scores_fwd(q_ptr, bank_ptr, idx_ptr, out_ptr, K, D: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
        offs_d = tl.arange(0, BLOCK_D)  # (BD,)
        mask_k = offs_k < K
        mask_d = offs_d < D
        q = tl.load(q_ptr + b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BD,)
        rows = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0)  # (BK,) int64
        m = tl.load(bank_ptr + rows[:, None] * D + offs_d[None, :],
                    mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BK, BD)
        tl.store(out_ptr + b * K + offs_k, tl.sum(m * q[None, :], axis=1), mask=mask_k)

    def _scores_bwd(grad_ptr, bank_ptr, idx_ptr, part_ptr, K, K_PER_SPLIT, D: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        # Accumulate in 2-D and reduce over K once at the end: a per-step tl.sum(axis=0) would be a
        # cross-warp reduction (shared memory and a barrier) on every BLOCK_K rows.
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)  # (BK,)
            mask_k = offs_k < K
            g = tl.load(grad_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # (BK,)
            rows = tl.load(idx_ptr + b * K + offs_k, mask=mask_k, other=0)  # (BK,)
            m = tl.load(bank_ptr + rows[:, None] * D + offs_d[None, :],
                        mask=mask_k[:, None] & mask_d[None, :], other=0.0).to(tl.float32)  # (BK, BD)
            acc += g[:, None] * m
        tl.store(part_ptr + (b * tl.num_programs(1) + split) * D + offs_d, tl.sum(acc, axis=0), mask=mask_d)

    def _bank_update(bank_ptr, emb_ptr, sorted_idx_ptr, order_ptr, first_ptr, end_ptr, momentum,
                     D: tl.constexpr, BLOCK_D: tl.constexpr):
        j = tl.program_id(0)  # position in the stably sorted gathered batch
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        row = tl.load(sorted_idx_ptr + j)
        end = tl.load(end_ptr + j)  # one past the last position holding the same row
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(j, end):  # the run of equal indices, in gathered order: a fixed summation order
            e = tl.load(order_ptr + i)
            acc += tl.load(emb_ptr + e * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        mean = acc / (end - j).to(tl.float32)
        m = tl.load(bank_ptr + row * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        v = momentum * m + (1.0 - momentum) * mean
        v = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), 1e-12)  # F.normalize's eps
        is_first = tl.load(first_ptr + j) != 0  # only the run's first position writes: one writer per row
        tl.store(bank_ptr + row * D + offs_d, v.to(bank_ptr.dtype.element_ty), mask=mask_d & is_first)


_JITTED: dict = {}
_TUNED: dict = {}
# triton.autotune on CUDA: the first launch at a new key (the split's length) times every config on the card and
# keeps the fastest; with cache_results (Triton >= 3.3) the choice is saved under TRITON_CACHE_DIR, so later
# processes skip the search. A small set: warps (4 or 8; the fp32 NCE loss kernel takes ~101 registers at 256
# threads, 2 programs per SM, tests/test_kernel_compile.py) and, for the split-K kernels, BLOCK_K 32 or 64 (both
# divide a split, which holds whole blocks of BLOCK_K = 64). The first config of each list is the untuned choice,
# used by Triton's interpreter and with PIRL_TRITON_AUTOTUNE=0.
AUTOTUNE = os.environ.get("PIRL_TRITON_AUTOTUNE", "1") != "0"


def configs(*choices: tuple[int | None, int]) -> list:
    """triton.Config per (BLOCK_K, num_warps); BLOCK_K None: the caller passes it itself. The first: the default."""
    if triton is None:
        return []
    return [triton.Config({} if bk is None else {"BLOCK_K": bk}, num_warps=w) for bk, w in choices]


def tuned(fn, choices: list, key: list[str]):
    """(launchable, meta): fn autotuned over `choices` by `key` (compiled kernels, AUTOTUNE on), meta {} as the
    configs supply their settings; else jit(fn) and meta = the first config's settings, passed by the caller."""
    if interpreted() or not AUTOTUNE:
        first = choices[0]
        return jit(fn), {**first.kwargs, "num_warps": first.num_warps}
    if fn not in _TUNED:
        extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        _TUNED[fn] = triton.autotune(configs=choices, key=key, **extra)(JITFunction(fn))
    return _TUNED[fn], {}


def jit(fn):
    """The launchable kernel `fn`, in the process's mode (`interpreted`), wrapped on first use.

    Not triton.jit at first use: that reads TRITON_INTERPRET again, and a variable changed after
    triton's import would give an interpreted kernel calling a compiled tl.sum, or the reverse.
    """
    if fn not in _JITTED:
        _JITTED[fn] = InterpretedFunction(fn) if interpreted() else JITFunction(fn)
    return _JITTED[fn]


SCORES_FWD_CONFIGS = configs((None, 4), (None, 8))  # BLOCK_K sets the grid: fixed; warps tuned
SPLIT_K_CONFIGS = configs((BLOCK_K, 4), (BLOCK_K // 2, 4), (BLOCK_K, 8))


class _TritonScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: Tensor, bank: Tensor, index: Tensor) -> Tensor:
        b, k = index.shape
        d = bank.shape[1]
        bank, index, q = bank.contiguous(), index.contiguous(), query.contiguous()
        out = torch.empty(b, k, device=query.device, dtype=torch.float32)  # (B, K)
        block_d = triton.next_power_of_2(d)
        if triton.cdiv(k, BLOCK_K) > 65535:  # CUDA's limit on grid dimension 1
            raise ValueError(f"K={k} negatives exceed the Triton kernel's limit of {65535 * BLOCK_K}; "
                             "use kernel='torch' or fewer negatives")
        kernel, meta = tuned(_scores_fwd, SCORES_FWD_CONFIGS, key=["K"])
        kernel[(b, triton.cdiv(k, BLOCK_K))](q, bank, index, out, k, D=d, BLOCK_K=BLOCK_K, BLOCK_D=block_d, **meta)
        ctx.save_for_backward(bank, index)
        ctx.query_dtype = query.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        bank, index = ctx.saved_tensors
        b, k = index.shape
        d = bank.shape[1]
        grad = grad.contiguous()
        splits, k_per_split = split_k(b, k, grad.device)  # split K so B*splits fills the GPU
        part = torch.empty(b, splits, d, device=grad.device, dtype=torch.float32)  # (B, S, D)
        kernel, meta = tuned(_scores_bwd, SPLIT_K_CONFIGS, key=["K", "K_PER_SPLIT"])
        kernel[(b, splits)](grad, bank, index, part, k, k_per_split, D=d, BLOCK_D=triton.next_power_of_2(d), **meta)
        return part.sum(1).to(ctx.query_dtype), None, None  # (B, D), a fixed-order (deterministic) sum


@torch.no_grad()
def bank_update(bank: Tensor, index: Tensor, embedding: Tensor, momentum: float, kernel: str = "auto") -> None:
    """In place: bank[i] <- normalize(mu * bank[i] + (1 - mu) * mean{embedding[j] : index[j] == i}).

    Duplicate rule: each distinct index is updated once, with the mean of all embeddings given
    for it, summed in the order they appear in `index` (after a stable sort). The result does
    not depend on scatter order, so it is bit-identical on every rank that runs it on the same
    gathered (index, embedding). index (M,) int64, embedding (M, D); the bank keeps its dtype.
    """
    if index.dim() != 1 or embedding.dim() != 2 or embedding.shape != (index.shape[0], bank.shape[1]):
        raise ValueError(f"expected index (M,), embedding (M, {bank.shape[1]}); got {tuple(index.shape)}, "
                         f"{tuple(embedding.shape)}")
    if index.numel() == 0:
        return
    check_index(index, bank.shape[0])
    kernel = resolve_kernel(kernel, bank.device)
    sorted_idx, order = torch.sort(index, stable=True)  # (M,), (M,): equal indices adjacent, in given order
    if kernel == "triton":
        m = index.shape[0]
        pos = torch.arange(m, device=index.device)  # (M,)
        change = sorted_idx[1:] != sorted_idx[:-1]  # (M-1,)
        first = torch.cat([change.new_ones(1), change])  # (M,) True where a run starts
        last = torch.cat([change, change.new_ones(1)])  # (M,) True where a run ends
        end = torch.where(last, pos + 1, m).flip(0).cummin(0).values.flip(0)  # (M,) one past the run's end
        emb = embedding.contiguous()
        if not bank.is_contiguous():
            raise ValueError("bank_update(kernel='triton') updates the bank in place and needs it contiguous")
        # One warp per row: 32 threads x 4 fp32 = a 128-wide row in 16-byte loads (4 warps would load 4 bytes each)
        jit(_bank_update)[(m,)](bank, emb, sorted_idx, order, first.to(torch.int8), end, float(momentum),
                                D=bank.shape[1], BLOCK_D=triton.next_power_of_2(bank.shape[1]), num_warps=1)
        return
    # torch / naive: the same formula with PyTorch ops (unique_consecutive syncs on CUDA; fine for a fallback)
    rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)  # (U,), (U,)
    sums = torch.segment_reduce(embedding[order].float(), "sum", lengths=counts, axis=0)  # (U, D)
    mean = sums / counts.unsqueeze(1).float()
    v = momentum * bank[rows].float() + (1.0 - momentum) * mean  # (U, D)
    bank[rows] = torch.nn.functional.normalize(v, dim=1).to(bank.dtype)
