r"""A small compiled CPU kernel for stage 1 of the pair map: the row minima of the all-pairs search
(and the unit neurons of the exact search's blocks, :meth:`CpuKernel.unit_neurons`).

KeOps evaluates a formula per pair, so on a CPU the pair's squared distance costs ``d`` flops inside
every ``(i, j)`` evaluation (at a fraction of the GEMM rate), and each operation of the formula is a
separate pass over a stack array. This kernel (``csrc/pair_rowmin.cpp``) takes the distances from one
GEMM per block of anchors, ``G = X[rows] Xᵀ``, computed by PyTorch, and does only the per-neuron work,

.. math::
    \min_j\ A_{ij} + R_{ij} (a_{im} + b_{jm}) + K_{ij} g_m,

one add, two multiply-adds and a min per ``(i, j, m)``, with four anchors sharing each load of ``b_j``
and tiles of partners that stay in L2 while 32 anchors use them.

Measured on one core of a 2-core AMD EPYC (AVX-512), in ns per ``(i, j, m)``: this kernel 0.02-0.04
(N = 2,000-20,000), the GEMM of the distances 0.06-0.07 at d = 784, KeOps' per-neuron part 0.08 and
its ``sqdist`` another 0.24 at d = 784; ``torch.compile`` (inductor's C++ for the same
elementwise-and-min block, compiled in 3-5 s) 0.14-0.19, and a KeOps formula fed precomputed pair
factors through one-hot selections 0.3-1.6: neither is used.

It is compiled once per machine with the system's C++ compiler (``$CXX``, else ``g++``, ``c++`` or
``clang++``), with ``-march=native`` and OpenMP where they work, into
``$LIGHTNING_SWIM_CPU_KERNEL_CACHE`` (default ``~/.cache/lightning_swim/cpu-kernel``); the file name
hashes the source, the compiler, the flags and the processor, and is written atomically, so that
concurrent processes and machines sharing a home folder never load each other's half-written or
foreign binaries. A freshly loaded kernel is checked against plain PyTorch on a small problem before
it is used. ``LIGHTNING_SWIM_CPU_KERNEL=0`` turns it off; wherever it cannot be built the search runs in
plain PyTorch or KeOps (:func:`lightning_swim._search.rowmin`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CpuKernelUnavailableError", "load_cpu_kernel"]

SOURCE = Path(__file__).with_name("csrc") / "pair_rowmin.cpp"
BASE_FLAGS = ("-O3", "-std=c++11", "-shared", "-fPIC", "-ffp-contract=fast", "-fno-math-errno")
NEURON_PAD = 32  # the neuron axis is padded to a multiple of this (>= the kernel's widest register block)
_state: dict[str, Any] = {"kernel": None, "error": None}


class CpuKernelUnavailableError(RuntimeError):
    """The CPU kernel is turned off, or cannot be compiled or loaded on this machine."""


def kernel_enabled() -> bool:
    """False where ``LIGHTNING_SWIM_CPU_KERNEL`` is ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get("LIGHTNING_SWIM_CPU_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_cache_dir() -> Path:
    """The folder the compiled kernel is kept in."""
    env = os.environ.get("LIGHTNING_SWIM_CPU_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(base) / "lightning_swim" / "cpu-kernel"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    raise CpuKernelUnavailableError("no C++ compiler found (set $CXX, or install g++ or clang++)")


def _processor_id() -> str:
    """The processor, as far as ``-march=native`` can tell them apart."""
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        ident += "".join(sorted(set(lines)))
    except OSError:  # not Linux: the machine name is the best we have
        pass
    return ident


def _build(cache: Path) -> Path:
    """Compile the kernel into ``cache`` (or find it there) and return the library's path."""
    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise CpuKernelUnavailableError(f"the C++ compiler {cxx} does not run: {err}") from err
    source = SOURCE.read_bytes()
    variants = []  # the fastest flags first; every variant computes the same numbers
    for extra in (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ()):
        flags = (*BASE_FLAGS, *extra)
        key = hashlib.sha1(b"\0".join([source, cxx.encode(), version.encode(), " ".join(flags).encode()]))
        if "-march=native" in extra:
            key.update(_processor_id().encode())
        variants.append((extra, flags, cache / f"pair_rowmin-{key.hexdigest()[:16]}.so"))
    for _, _, lib in variants:
        if lib.exists():
            return lib
    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra, flags, lib in variants:
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".building-", suffix=".so")
        os.close(fd)
        try:
            out = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
            if out.returncode == 0:
                os.replace(tmp, lib)  # atomic: other processes see the whole library or none
                return lib
            lines = out.stderr.strip().splitlines() or ["no message"]
            first_error = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
            errors.append(f"{' '.join(extra) or 'plain'}: {first_error[:200]}")
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{' '.join(extra) or 'plain'}: {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise CpuKernelUnavailableError(f"the CPU kernel did not compile with {cxx} ({'; '.join(errors)})")


@dataclass
class PwlRows:
    """The unit rows of :meth:`CpuKernel.unit_neurons` (row ``b N + j``: the pair ``(rows[b], j)``), given by
    what builds them, for :meth:`CpuKernel.screen` to build again the rows it reads: ``gram [N, N]``,
    ``rows [B]``, ``r, c [B, N]``, ``slope`` and ``inv [B, N]`` (``1 / |h|``), contiguous."""

    gram: Tensor
    rows: Tensor
    r: Tensor
    c: Tensor
    slope: float
    inv: Tensor


class CpuKernel:
    """The loaded library, called block by block from :func:`lightning_swim._search.rowmin_torch`."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        i64, ptr, dbl, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
        self._fns = {}
        for dtype, name in ((torch.float32, "ls_rowmin_f32"), (torch.float64, "ls_rowmin_f64")):
            fn = getattr(lib, name)
            fn.argtypes = [i64, i64, i64, i64, i64, *[ptr] * 8, dbl, dbl, c_int, dbl, ptr, c_int]
            fn.restype = c_int
            self._fns[dtype] = fn
        self._unit = {}
        for dtype, name in ((torch.float32, "ls_unit_neurons_f32"), (torch.float64, "ls_unit_neurons_f64")):
            fn = getattr(lib, name)
            fn.argtypes = [i64, i64, *[ptr] * 4, dbl, ptr, ptr, ptr, c_int]
            fn.restype = None
            self._unit[dtype] = fn
        lib.ls_screen_counts.argtypes = [i64, i64, *[ptr] * 4, c_int]
        lib.ls_screen_counts.restype = c_int
        self._screen_counts = lib.ls_screen_counts
        self._screen_exact, self._screen_exact_pwl = {}, {}
        for dtype, name in ((torch.float32, "f32"), (torch.float64, "f64")):
            fn = getattr(lib, f"ls_screen_exact_{name}")
            fn.argtypes = [i64, i64, i64, *[ptr] * 8, c_int]
            fn.restype = c_int
            self._screen_exact[dtype] = fn
            fn = getattr(lib, f"ls_screen_exact_pwl_{name}")
            fn.argtypes = [i64, i64, i64, *[ptr] * 7, dbl, *[ptr] * 5, c_int]
            fn.restype = c_int
            self._screen_exact_pwl[dtype] = fn
        lib.ls_crc32c.argtypes = [ctypes.c_char_p, i64]
        lib.ls_crc32c.restype = ctypes.c_uint32
        self._crc32c = lib.ls_crc32c
        lib.ls_neuron_block.argtypes = [i64]
        lib.ls_neuron_block.restype = i64
        if any(NEURON_PAD % lib.ls_neuron_block(s) for s in (4, 8)):  # pragma: no cover - a foreign build
            raise CpuKernelUnavailableError("the CPU kernel's register block does not divide the neuron padding")

    def rowmin_block(
        self,
        gram: Tensor,
        row0: int,
        x: Tensor,
        sq: Tensor,
        sqy: Tensor,
        groups: Tensor,
        a: Tensor,
        b: Tensor,
        g: Tensor,
        consts: tuple[float, float, bool, float],
        out: Tensor,
    ) -> None:
        """Fill ``out [R, Mp]`` with the row minima of anchors ``row0 .. row0 + R - 1``.

        ``gram [R, N]`` is ``y[row0 : row0 + R] @ y.T`` for the centred points ``y``; ``x [N, d]``, ``sq [N]``
        (``|x|^2``), ``sqy [N]`` (``|y|^2``), ``groups [N]`` (int64), ``a, b [N, Mp]`` (``Mp`` a multiple of
        :data:`NEURON_PAD`) and ``g [Mp]`` are contiguous CPU tensors of one floating dtype (``groups``:
        int64); ``consts`` is ``(kappa, alpha, homogeneous, tol)``.
        """
        nrows, n = gram.shape
        kappa, alpha, homogeneous, tol = consts
        status = self._fns[x.dtype](
            nrows,
            row0,
            n,
            x.shape[1],
            a.shape[1],
            *(t.data_ptr() for t in (gram, x, sq, sqy, groups, a, b, g)),
            kappa,
            alpha,
            int(homogeneous),
            tol,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:  # pragma: no cover - guarded by the padding above
            raise RuntimeError(f"the CPU kernel refused its arguments (status {status})")

    def unit_neurons(
        self,
        gram: Tensor,
        rows: Tensor,
        r: Tensor,
        c: Tensor,
        slope: float,
        out: Tensor | None,
        out_bf16: Tensor,
        inv: Tensor | None = None,
    ) -> None:
        """Fill ``out [B, N, N]`` with the unit SWIM neurons of the pairs ``(rows[b], j)`` of the exact
        search, ``h / |h|`` with ``h = max(z, 0) + slope min(z, 0)``, ``z_bjn = (G_jn - G_{rows[b] n}) r_bj
        + c_bj``, ``out_bf16`` with the same rounded to bfloat16 (to nearest even), and ``inv [B, N]`` with
        ``1 / |h|``; ``out`` or ``inv`` None: not written.

        ``gram [N, N]``, ``r, c [B, N]``, ``out`` and ``inv`` are contiguous CPU tensors of one floating
        dtype, ``rows [B]`` int64, ``out_bf16 [B, N, N]`` contiguous bfloat16.
        """
        B, N = r.shape
        self._unit[gram.dtype](
            B,
            N,
            *(t.data_ptr() for t in (rows, gram, r, c)),
            slope,
            out.data_ptr() if out is not None else None,
            out_bf16.data_ptr(),
            inv.data_ptr() if inv is not None else None,
            torch.get_num_threads(),
        )

    def screen(
        self,
        chat: Tensor,
        thr: Tensor,
        h: Tensor | PwlRows,
        a_t: Tensor,
        trim: Callable[[Tensor], Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The screen of the exact search: ``(p, m, cos)`` of every entry of ``chat`` with
        ``chat[p, m] >= thr[m]``, row-major (as ``nonzero`` orders them), and its cosine computed again
        exactly, ``cos = <h[p], a_t[m]>`` (as one sampled product gives it).

        ``chat [P, M]`` is contiguous bfloat16, ``thr [M]`` float32 (compared in float32); ``h [P, N]``
        (or the :class:`PwlRows` that build its rows again) and ``a_t [M, N]`` are contiguous CPU tensors
        of one floating dtype. ``trim``, given the number of entries of each neuron ``[M]``, may return
        lower thresholds ``[M]`` (those entries are then returned), or None.
        """
        P, M = chat.shape
        rows, neurons = torch.empty(P, dtype=torch.long), torch.empty(M, dtype=torch.long)
        self._count(chat, thr, rows, neurons)
        if trim is not None and (trimmed := trim(neurons)) is not None:
            thr = trimmed.contiguous()
            self._count(chat, thr, rows, neurons)
        offsets = torch.cumsum(rows, 0) - rows
        k = int(neurons.sum())
        p, m, cos = torch.empty(k, dtype=torch.long), torch.empty(k, dtype=torch.long), torch.empty(k, dtype=a_t.dtype)
        n, threads = a_t.shape[1], torch.get_num_threads()
        if isinstance(h, Tensor):
            ptrs = (chat, thr, offsets, h, a_t, p, m, cos)
            status = self._screen_exact[a_t.dtype](P, M, n, *(t.data_ptr() for t in ptrs), threads)
        else:
            before, after = (chat, thr, offsets, h.rows, h.gram, h.r, h.c), (h.inv, a_t, p, m, cos)
            ptrs_before, ptrs_after = (t.data_ptr() for t in before), (t.data_ptr() for t in after)
            status = self._screen_exact_pwl[a_t.dtype](P, M, n, *ptrs_before, h.slope, *ptrs_after, threads)
        if status != 0:  # pragma: no cover - out of memory for a row
            raise MemoryError("the CPU kernel could not allocate its per-thread rows")
        return p, m, cos

    def crc32c(self, data: bytes) -> int:
        """The CRC-32C (Castagnoli) of ``data``, as TensorBoard's event records use it."""
        return int(self._crc32c(data, len(data)))

    def _count(self, chat: Tensor, thr: Tensor, rows: Tensor, neurons: Tensor) -> None:
        P, M = chat.shape
        ptrs = (t.data_ptr() for t in (chat, thr, rows, neurons))
        if self._screen_counts(P, M, *ptrs, torch.get_num_threads()) != 0:  # pragma: no cover - out of memory
            raise MemoryError("the CPU kernel could not allocate its per-thread neuron counts")


def _load(cache: Path) -> CpuKernel:
    """Build (or find) the kernel in ``cache`` and load it; a damaged library is rebuilt once."""
    path = _build(cache)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:  # a damaged file (a full disk, an interrupted copy): build it again, once
        path.unlink(missing_ok=True)
        path = _build(cache)
        lib = ctypes.CDLL(str(path))
    return CpuKernel(lib, path)


def load_cpu_kernel() -> CpuKernel:
    """The compiled kernel, built on first use.

    Raises:
        CpuKernelUnavailableError: if it is turned off or cannot be built or loaded here (the reason is
            kept, and the build is not retried in this process).
    """
    if not kernel_enabled():
        raise CpuKernelUnavailableError("the CPU kernel is turned off by LIGHTNING_SWIM_CPU_KERNEL=0")
    if _state["kernel"] is not None:
        return _state["kernel"]
    if _state["error"] is not None:
        raise CpuKernelUnavailableError(_state["error"])
    try:
        kernel = _load(kernel_cache_dir())
    except CpuKernelUnavailableError as err:
        _state["error"] = str(err)
        raise
    except Exception as err:  # anything else while building or loading: same outcome, with the reason
        _state["error"] = f"the CPU kernel could not be loaded: {type(err).__name__}: {err}"
        raise CpuKernelUnavailableError(_state["error"]) from err
    _state["kernel"] = kernel
    return kernel
