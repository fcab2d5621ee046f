"""An optional C kernel for Spade's voxel matching on CPU, compiled on first use with the system's C compiler.

The torch matching (``correspondence.match_voxels``: candidate sampling, the window search, the choice of matches)
is ~90 small operations on tensors of a few thousand entries; on CPU their dispatch is most of its cost (about 40 %
of Spade's selection + loss in a CPU-budget step). ``match_voxels`` here does the same in one call, with the same
pairs from the same random scores (up to exact ties of the scores). Without a C compiler (or with
``NNUNET_SSL_NATIVE=0``) it returns None and the torch matching runs: the same pairs, more slowly.

The library is built once per source version, compiler and machine type into ``$NNUNET_SSL_CACHE`` (default
``~/.cache/nnunet_ssl``), written under a temporary name and renamed, so parallel processes (DDP ranks, test
workers) never load a half-written file."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("nearest.c")
# -ffp-contract=off: no fused multiply-adds, so the squared distances are the torch search's to the bit
FLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-std=c99")


def cache_dir() -> Path:
    root = os.environ.get("NNUNET_SSL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nnunet_ssl")
    return Path(root)


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (switched off, no compiler, or the build failed: one warning says which)."""
    if os.environ.get("NNUNET_SSL_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        warnings.warn("nnunet_ssl: no C compiler found (cc, gcc, clang or $CC): Spade's voxel matching uses the "
                      "slower torch search on CPU (same pairs); install one, or set NNUNET_SSL_NATIVE=0 to silence "
                      "this")
        return None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + "\0".join((cc, *FLAGS, platform.machine(), platform.system())).encode()).hexdigest()
    target = cache_dir() / f"nearest_{key[:16]}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"], check=True, capture_output=True,
                           timeout=120)
            os.replace(tmp, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        warnings.warn(f"nnunet_ssl: building the C kernel with {cc} failed ({type(e).__name__}: "
                      f"{detail.decode(errors='replace').strip().splitlines()[-1:] or e}): Spade's voxel matching "
                      f"uses the slower torch search on CPU (same pairs); NNUNET_SSL_NATIVE=0 silences this")
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nearest_within.restype = lib.match_voxels.restype = ctypes.c_int
    lib.nearest_within.argtypes = [ptr, i64, i64, ptr, ptr, i64, ctypes.c_double, ptr, ptr]
    lib.match_voxels.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_double, ptr, ptr, ptr, ptr]
    return lib


def nearest_within(query: Tensor, points: Tensor, ok: Tensor, tolerance: float) -> Optional[Tuple[Tensor, Tensor]]:
    """For query (B, M, 3) and points (B, V, 3) on the CPU, with ok (B, V) marking the points that count: the
    index (B, M) int64 of each query's nearest ok point and the squared distance (B, M) float32, exact whenever that
    point lies within ``tolerance``; index 0 and +inf where no ok point lies within about ``tolerance`` (farther
    results are the nearest of the cells searched). Ties: the lowest index. None where the kernel is unavailable
    (not on CPU, no compiler): use the torch search."""
    if query.device.type != "cpu" or points.device.type != "cpu" or not (tolerance >= 0 and tolerance < float("inf")):
        return None
    lib = library()
    if lib is None:
        return None
    bsz, m = query.shape[:2]
    n = points.shape[1]
    q = query.detach().to(torch.float32).contiguous()
    p = points.detach().to(torch.float32).contiguous()
    v = ok.detach().to(torch.bool).contiguous()
    idx = torch.empty((bsz, m), dtype=torch.int64)
    d2 = torch.empty((bsz, m), dtype=torch.float32)
    if bsz * m == 0:
        return idx, d2
    if lib.nearest_within(q.data_ptr(), bsz, m, p.data_ptr(), v.data_ptr(), n, float(tolerance), idx.data_ptr(),
                          d2.data_ptr()) != 0:
        raise MemoryError(f"nnunet_ssl: the C voxel matching could not allocate memory for {n} points")
    return idx, d2


def match_voxels(pa: Tensor, va: Tensor, pb: Tensor, vb: Tensor, scores: Tensor, num_candidates: int,
                 num_samples: int, tolerance: float) -> Optional[Dict[str, Tensor]]:
    """``correspondence.match_voxels`` on the CPU from its random scores (B, V) (one per voxel of view a, in [0, 1)):
    positions pa, pb (B, V, 3), validity va, vb (B, V); the ``num_candidates`` eligible voxels of view a with the
    highest scores are searched, and the ``num_samples`` matches with the highest scores fill the slots, in
    descending score order. Returns its dict ('index_a', 'index_b', 'mask', 'distance'), or None where the kernel
    is unavailable (not on CPU, no compiler)."""
    if any(t.device.type != "cpu" for t in (pa, va, pb, vb, scores)) or not 0 <= tolerance < float("inf"):
        return None
    lib = library()
    if lib is None:
        return None
    bsz, n = pa.shape[:2]
    k = int(num_samples)
    f32 = [t.detach().to(torch.float32).contiguous() for t in (pa, pb, scores)]
    flags = [t.detach().to(torch.bool).contiguous() for t in (va, vb)]
    out = {"index_a": torch.empty((bsz, k), dtype=torch.int64), "index_b": torch.empty((bsz, k), dtype=torch.int64),
           "mask": torch.empty((bsz, k), dtype=torch.bool), "distance": torch.empty((bsz, k), dtype=torch.float32)}
    if bsz * k == 0:
        return out
    if lib.match_voxels(f32[0].data_ptr(), flags[0].data_ptr(), f32[1].data_ptr(), flags[1].data_ptr(),
                        f32[2].data_ptr(), bsz, n, int(num_candidates), k, float(tolerance),
                        *(out[key].data_ptr() for key in ("index_a", "index_b", "mask", "distance"))) != 0:
        raise MemoryError(f"nnunet_ssl: the C voxel matching could not allocate memory for {n} voxels")
    return out
