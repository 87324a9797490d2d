"""Native CPU kernels for the decoding step, compiled on first use with the system C compiler, loaded with ctypes.

decode.c holds three: a linear layer for at most 16 rows (optionally RMS-normalising its input first, several
weight matrices side by side, accumulating into a residual), the SwiGLU hidden layer, and single-token attention
against the KV cache (rotary embedding and cache write included). See its header for why they exist.

The library is built once per machine into ``$FORGELINE_CACHE_DIR`` (default ``~/.cache/forgeline``), keyed by
the source, the compiler flags and the CPU's feature flags, written under a temporary name and renamed so parallel
first uses never load half a file. No torch headers are involved: a build takes about a second.

Everything here is optional. Without a C compiler, off Linux, with ``FORGELINE_NATIVE_KERNELS=0``, or when a
build fails, :func:`available` is False and callers keep torch's own operators.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["MAX_ROWS", "attention", "available", "linear", "supports", "swiglu"]

log = logging.getLogger(__name__)

MAX_ROWS = 16  # MAX_ROWS in decode.c
MAX_MATRICES = 3
_SOURCE = Path(__file__).with_name("decode.c")
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}

_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "forgeline_linear": [_p, _p, _f32, _p, _p, _p, _int, _p, _i64, _i64, _int, _int, _int],
    "forgeline_swiglu": [_p, _p, _f32, _p, _p, _p, _i64, _i64, _i64, _int, _int],
    "forgeline_attention": [_p, _p, _p, _p, _p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _int, _int],
}


def _cache_dir() -> Path:
    root = os.environ.get("FORGELINE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "forgeline")
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _one_openmp_runtime() -> bool:
    """False when the process maps two different OpenMP runtimes (say torch's libiomp5 or its own libgomp copy and
    the system's libgomp): two pools on few cores spin against each other (shared/notes/machine.md), far slower
    than torch's own kernels."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return True
    runtimes = {line.split()[-1] for line in maps.splitlines()
                if "/" in line and any(name in line for name in ("libgomp", "libiomp", "libomp"))}
    return len(runtimes) <= 1


def _build(compiler: str, flags: list[str]) -> Path | None:
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_flags().encode(),
                                     compiler.encode()])).hexdigest()[:16]
    name = f"decode-{key}.so"
    # a read-only home (some CI runners, containers) falls back to the temp directory
    for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"forgeline-kernels-{os.getuid()}"):
        target = folder / name
        if target.exists():
            return target
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                built = Path(tmp) / name
                subprocess.run([compiler, *flags, "-shared", "-fPIC", str(_SOURCE), "-o", str(built), "-lm"],
                               check=True, capture_output=True, timeout=120)
                os.replace(built, target)
            return target
        except subprocess.CalledProcessError as exc:  # the compiler refused these flags: no other folder helps
            log.debug("building %s with %s failed: %s", _SOURCE.name, flags, exc.stderr.decode(errors="replace")[-500:])
            return None
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("building %s in %s failed: %s", _SOURCE.name, folder, exc)
    return None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FORGELINE_NATIVE_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    for flags in (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"]):
        path = _build(compiler, flags)
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            log.debug("loading %s failed: %s", path, exc)
            continue
        if not _one_openmp_runtime():
            log.warning("forgeline's native decode kernels brought a second OpenMP runtime; using torch's operators")
            return None
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return lib
    return None


def available() -> bool:
    return _library() is not None


def supports(*tensors: torch.Tensor | None, dtype: torch.dtype | None = None) -> bool:
    """Whether these parameters can be handed to the kernels: plain contiguous CPU tensors (not DTensor shards or
    quantized subclasses) of one dtype, fp32 or bf16. None entries (absent biases) are fine."""
    present = [t for t in tensors if t is not None]
    dtype = dtype or (present[0].dtype if present else None)
    return dtype in _DTYPE_CODE and all(
        type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and t.is_contiguous()
        and t.dtype == dtype for t in present)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"forgeline native kernel {what} rejected its arguments")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None = None, *,
           norm_weight: torch.Tensor | None = None, eps: float = 0.0, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
    """[rms_norm(x) * norm_weight] @ cat(weights).T + cat(biases), for x (rows, K) contiguous with rows <= MAX_ROWS.
    With accumulate, adds into `out` (a residual stream) instead of overwriting it."""
    lib = _library()
    rows, K = x.shape
    n = [w.shape[0] for w in weights]
    if out is None:
        out = torch.empty((rows, sum(n)), dtype=x.dtype)
    biases = list(biases) if biases is not None else [None] * len(weights)
    w_arr = (ctypes.c_void_p * MAX_MATRICES)(*[w.data_ptr() for w in weights])
    b_arr = (ctypes.c_void_p * MAX_MATRICES)(*[_ptr(b) for b in biases])
    n_arr = (ctypes.c_int64 * MAX_MATRICES)(*n)
    _check(lib.forgeline_linear(x.data_ptr(), _ptr(norm_weight), eps, w_arr, b_arr, n_arr, len(weights),
                                out.data_ptr(), rows, K, _DTYPE_CODE[x.dtype], int(accumulate),
                                torch.get_num_threads()), "linear")
    return out


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
           eps: float = 0.0) -> torch.Tensor:
    """silu(x' w1^T) * (x' w3^T) with x' = rms_norm(x) * norm_weight (or x itself), x (rows, K) contiguous."""
    lib = _library()
    rows, K = x.shape
    out = torch.empty((rows, w1.shape[0]), dtype=x.dtype)
    _check(lib.forgeline_swiglu(x.data_ptr(), _ptr(norm_weight), eps, w1.data_ptr(), w3.data_ptr(), out.data_ptr(),
                                rows, w1.shape[0], K, _DTYPE_CODE[x.dtype], torch.get_num_threads()), "swiglu")
    return out


def attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              pos: int, *, n_heads: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row: rotate its query and key (cos, sin: (B, head_dim) fp32), write key and value at cache
    position `pos`, and attend over positions 0..pos. qkv (B, (n_heads + 2 kv_heads) * head_dim); caches
    (B, kv_heads, cache_len, head_dim); key_mask (B, pos + 1) uint8, 1 = attend. Returns (B, n_heads * head_dim)."""
    lib = _library()
    B, n_kv, cache_len, D = k_cache.shape
    out = torch.empty((B, n_heads * D), dtype=qkv.dtype)
    _check(lib.forgeline_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                   v_cache.data_ptr(), _ptr(key_mask), out.data_ptr(), B, n_heads, n_kv, D, cache_len,
                                   pos, D ** -0.5, _DTYPE_CODE[qkv.dtype], torch.get_num_threads()), "attention")
    return out
