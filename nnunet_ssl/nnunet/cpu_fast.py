"""CPU fast path: bfloat16 autocast plus channels-last memory layout for training on CPUs with native bf16.

Stock nnU-Net turns mixed precision off on CPU. On CPUs with AVX-512 BF16 or AMX, oneDNN runs bf16 convolutions
in channels-last layout much faster than float32 (a PlainConvUNet step about 2x). :class:`CPUFastPathMixin` gives
the plugin's trainers that path: on by default where the CPU supports bf16, off elsewhere; losses stay float32.

Setting, strongest first: the environment variable ``NNUNET_SSL_CPU_BF16`` (0/1), the class attribute
``cpu_bf16`` (True/False), automatic detection (``cpu_bf16 = None``). CUDA and MPS runs are never affected.

Two float32 options for CPUs without bf16, measured side by side by ``nnunet-ssl bench-speed --cpu-fast compare``:
channels-last layout without bf16 (``cpu_channels_last`` / ``NNUNET_SSL_CPU_CHANNELS_LAST``; default on: oneDNN's
float32 convolutions are faster in it, and instance norms that keep the layout (``cpu_channels_last_norm``) save
instance_norm's copies: CPU-budget steps 1.3-1.6x faster, the step equal within 1e-4, Dice unchanged in a paired
check) and
``torch.compile`` of the segmentation network on CPU (``cpu_compile`` / ``NNUNET_SSL_CPU_COMPILE``; nnU-Net itself
never compiles on CPU; default off: slower than channels-last alone on the CPU budget).

Training on CPU also keeps freed memory in the process for reuse (``keep_freed_memory``; ``cpu_keep_freed_memory``
/ ``NNUNET_SSL_CPU_MALLOC``, default on): with glibc's defaults every step maps fresh pages for its activations and
gradients and the kernel zero-fills them, thousands of page faults per step.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "NNUNET_SSL_CPU_BF16"
CHANNELS_LAST_ENV = "NNUNET_SSL_CPU_CHANNELS_LAST"
COMPILE_ENV = "NNUNET_SSL_CPU_COMPILE"
MALLOC_ENV = "NNUNET_SSL_CPU_MALLOC"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic (x86)


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags listed in ``cpuinfo_path`` (empty where the file does not exist, e.g. macOS)."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16(cpuinfo_path: str = "/proc/cpuinfo", torch_capability: str | None = None) -> bool:
    """True when the CPU has native bf16 (AVX-512 BF16 or AMX) and torch dispatches AVX-512 kernels: below that
    level (e.g. ``ATEN_CPU_CAPABILITY=avx2``) bf16 element-wise ops are emulated and slower than float32."""
    if not set(BF16_CPU_FLAGS) & cpu_flags(cpuinfo_path):
        return False
    capability = torch.backends.cpu.get_cpu_capability() if torch_capability is None else torch_capability
    return capability.upper().startswith("AVX512") and torch.backends.mkldnn.is_available()


@functools.lru_cache(maxsize=1)
def _this_cpu_supports_bf16() -> bool:
    return cpu_supports_bf16()


def resolve_cpu_bf16(setting: bool | None, device: torch.device) -> tuple[bool, str]:
    """(fast path on?, why) for a trainer with class attribute ``cpu_bf16 = setting`` on ``device``."""
    if device.type != "cpu":
        return False, f"device is {device.type}"
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("1", "true", "on", "yes"):
        return True, f"{ENV_VAR}={env}"
    if env in ("0", "false", "off", "no"):
        return False, f"{ENV_VAR}={env}"
    if env:
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {os.environ[ENV_VAR]!r}")
    if setting is not None:
        return bool(setting), f"cpu_bf16 = {setting}"
    if _this_cpu_supports_bf16():
        return True, "auto: the CPU has native bf16 (" + "/".join(BF16_CPU_FLAGS) + ")"
    return False, "auto: the CPU has no native bf16 (" + "/".join(BF16_CPU_FLAGS) + ")"


def env_flag(name: str) -> bool | None:
    """A 0/1 environment switch: True, False, or None where it is not set."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    if value:
        raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")
    return None


NUM_THREADS = "NNUNET_SSL_NUM_THREADS"


def apply_thread_limit(log=None) -> None:
    """``NNUNET_SSL_NUM_THREADS=N`` caps torch's intra-op threads of a training process. nnUNetv2_train sets
    ``torch.set_num_threads(cpu_count)`` on CPU whatever OMP_NUM_THREADS says, so two trainings side by side (the
    benchmark's --jobs 2) would run 2 x cpu_count threads: oversubscribed, each step ran ~8x slower than alone
    on 2 cores. The trainers apply the cap when they initialise, after nnU-Net's call."""
    value = os.environ.get(NUM_THREADS, "").strip()
    if value:
        try:
            n = int(value)
            assert n > 0
        except (ValueError, AssertionError):
            raise ValueError(f"{NUM_THREADS}={value!r}: expected a positive number of threads") from None
        torch.set_num_threads(n)
        if log is not None:
            log(f"torch threads capped at {n} ({NUM_THREADS})")


# glibc's mallopt parameters and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (64-bit): blocks below it come from the heap, whose pages are reused
TRIM_THRESHOLD = 1 << 30   # free memory at the heap's top handed back to the system only above this
_kept_freed_memory: bool | None = None  # None: not tried in this process; else whether it took effect


def keep_freed_memory(log=None, default: bool = True) -> bool:
    """Let glibc's malloc keep freed memory for reuse in this process: blocks up to 32 MiB from the heap instead of
    their own mappings, and the heap not shrunk until 1 GiB of it is free (``mallopt`` M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD). Torch allocates every activation, gradient and temporary of a CPU step with malloc; with
    glibc's defaults, freed blocks go back to the system and the next step's blocks are fresh pages the kernel
    zero-fills on first touch: 3 000-21 000 page faults per CPU-budget step, 5-10 % of a float32 step in a process
    that trains one trainer (BENCHMARKS.md, "CPU step cost"). Peak memory stays within 1 % (the step reuses what
    it freed). Process-wide, once. ``NNUNET_SSL_CPU_MALLOC`` (0/1) decides when set, else ``default`` (a trainer's
    ``cpu_keep_freed_memory``). Returns whether the setting holds: False when not asked for, or where the C library
    is not glibc (nothing changes there)."""
    wanted = env_flag(MALLOC_ENV)
    if not (default if wanted is None else wanted):
        return False
    kept = _apply_keep_freed_memory()
    if log is not None:
        log("CPU allocator: freed memory kept for reuse (glibc mallopt: blocks < 32 MiB from the heap, trimmed above "
            "1 GiB free)" if kept else "CPU allocator: unchanged (the C library is not glibc)")
    return kept


def _apply_keep_freed_memory() -> bool:
    """keep_freed_memory's mallopt calls, once per process (cached)."""
    global _kept_freed_memory
    if _kept_freed_memory is None:
        _kept_freed_memory = False
        try:
            import ctypes
            os.confstr("CS_GNU_LIBC_VERSION")  # ValueError / OSError where the C library is not glibc
            libc = ctypes.CDLL(None)
            _kept_freed_memory = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                      and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (ValueError, OSError, AttributeError):  # not glibc, no C library to load, or no mallopt in it
            _kept_freed_memory = False
    return _kept_freed_memory


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` took effect in this process (by any caller)."""
    return bool(_kept_freed_memory)


def cpu_bf16_autocast(enabled: bool = True):
    """bf16 autocast on CPU (a no-op context when not enabled)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def channels_last_format(ndim: int) -> torch.memory_format | None:
    """channels_last_3d for 5-D (3D conv) tensors, channels_last for 4-D (2D conv), None otherwise."""
    return {5: torch.channels_last_3d, 4: torch.channels_last}.get(ndim)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    fmt = channels_last_format(x.ndim)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def set_memory_format(modules: Iterable[nn.Module], channels_last: bool) -> None:
    """Re-lay out every 4-D/5-D parameter and buffer in place (``.data`` is replaced, the Parameter objects stay,
    so an optimizer built on them keeps working). ``to``, not ``contiguous``: a first convolution's weight with one
    input channel is already "contiguous" in both formats, and ``contiguous`` would leave its standard strides;
    oneDNN then writes that convolution's output in the standard layout, and the next convolution copies its input
    (and, in the backward, its gradient) to channels-last again, ~1.5 ms of a CPU-budget step."""
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            fmt = channels_last_format(t.ndim)
            if fmt is not None:
                t.data = t.data.to(memory_format=fmt if channels_last else torch.contiguous_format)


class _ChannelsLastInstanceNormFunction(torch.autograd.Function):
    """Instance norm of a (N, C, *S) float32 tensor in whatever layout it has, output in the same layout, from
    two-pass statistics: the mean (torch's cascade sum), then the sum of squares of the centred values, which the
    backward reuses (no cancellation either way). As precise as instance_norm (relative errors ~1e-7 against
    float64, tests/test_cpu_fast.py), without instance_norm's copy to the standard layout; torch.var_mean would do
    the same in one pass, but its Welford reduction over the non-contiguous spatial axes is ~10x slower here."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = tuple(range(2, x.dim()))
        n = x[0, 0].numel()
        centred = x - x.sum(dims, keepdim=True) / n
        rstd = torch.rsqrt((centred * centred).sum(dims, keepdim=True) / n + eps)
        per_channel = (1, -1) + (1,) * len(dims)
        scale = rstd if weight is None else rstd * weight.view(per_channel)
        ctx.save_for_backward(centred, weight, rstd)
        ctx.has_bias = bias is not None
        if bias is None:
            return centred * scale  # takes x's layout
        return torch.addcmul(bias.view(per_channel), centred, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        centred, weight, rstd = ctx.saved_tensors
        dims = tuple(range(2, centred.dim()))
        n = centred[0, 0].numel()
        sum_dy = dy.sum(dims, keepdim=True)
        sum_dy_xhat = (dy * centred).sum(dims, keepdim=True) * rstd  # sum of dy * normalised x
        a = rstd if weight is None else rstd * weight.view((1, -1) + (1,) * len(dims))
        # dx = a (dy - mean(dy) - xhat mean(dy xhat)), xhat = centred * rstd: a dy + (per channel) centred + const
        dx = torch.addcmul(-a * sum_dy / n, centred, -a * rstd * sum_dy_xhat / n).addcmul_(dy, a)
        d_weight = sum_dy_xhat.sum(0).flatten() if weight is not None else None
        d_bias = sum_dy.sum(0).flatten() if ctx.has_bias else None
        return dx, d_weight, d_bias, None


class _LayoutKeepingInstanceNorm:
    """An instance norm whose channels-last float32 input stays channels-last: torch's instance_norm copies it to
    the standard layout (and the next convolution copies it back), forward and backward. ``kernel``: 'precise'
    (_ChannelsLastInstanceNormFunction) or 'group_norm' (torch's group_norm with one channel per group, the same
    normalisation; its channels-last float32 kernel sums in one pass, ~1e-5 relative error per layer instead of
    ~1e-7, weight gradients of a CPU-budget step ~1e-3 off float64: measured, not the default). Only for norms that
    normalise with the sample's own statistics in training and evaluation (``track_running_stats=False``)."""

    kernel = "precise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self._batched_dim or x.dtype != torch.float32:  # e.g. unbatched: instance_norm's handling
            return super().forward(x)
        if self.kernel == "group_norm":
            return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
        return _ChannelsLastInstanceNormFunction.apply(x, self.weight, self.bias, self.eps)


class LayoutKeepingInstanceNorm2d(_LayoutKeepingInstanceNorm, nn.InstanceNorm2d):
    _batched_dim = 4


class LayoutKeepingInstanceNorm3d(_LayoutKeepingInstanceNorm, nn.InstanceNorm3d):
    _batched_dim = 5


_LAYOUT_KEEPING = {nn.InstanceNorm2d: LayoutKeepingInstanceNorm2d, nn.InstanceNorm3d: LayoutKeepingInstanceNorm3d}
CHANNELS_LAST_NORMS = ("precise", "group_norm", "torch")


def layout_keeping_instance_norms(modules: Iterable[nn.Module], kernel: str = "precise") -> int:
    """Switch every plain nn.InstanceNorm2d/3d without running statistics in ``modules`` to its layout-keeping form
    (in place: the class changes, parameters, buffers and state-dict keys stay). Returns how many were switched.
    ``kernel``: see _LayoutKeepingInstanceNorm; 'torch' switches nothing. For channels-last float32 on CPU (the bf16
    path keeps instance_norm, whose bf16 kernel is the faster one there)."""
    if kernel not in CHANNELS_LAST_NORMS:
        raise ValueError(f"cpu_channels_last_norm must be one of {CHANNELS_LAST_NORMS}, got {kernel!r}")
    if kernel == "torch":
        return 0
    n = 0
    for module in modules:
        for m in module.modules():
            keeping = _LAYOUT_KEEPING.get(type(m))
            if keeping is not None and not m.track_running_stats:
                m.__class__ = keeping
                m.kernel = kernel
                n += 1
    return n


def _outputs_to_float(output):
    if isinstance(output, (list, tuple)):
        return type(output)(_outputs_to_float(o) for o in output)
    return output.float()


def clip_and_step_if_finite(optimizer: torch.optim.Optimizer, params, max_norm: float) -> bool:
    """Clip the gradients and step, unless their norm is not finite; then skip the step (GradScaler's rule for
    fp16, which bf16 training has no scaler for). Rare bf16 steps of small networks give non-finite gradients
    while the loss is finite; one such step would otherwise turn every weight into NaN. True if stepped."""
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


class Float32Loss(nn.Module):
    """Computes ``loss`` on float32 copies of the network outputs with autocast off: nnU-Net's Dice+CE (and its
    deep-supervision wrapper) would otherwise run on bf16 logits, whose 8-bit mantissa makes soft Dice coarse."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output, target):
        with torch.autocast("cpu", enabled=False):
            return self.loss(_outputs_to_float(output), target)


class CPUFastPathMixin:
    """bf16 autocast + channels-last training on CPU for nnUNetTrainer subclasses (before the trainer in the bases).

    Composes through ``super()``: ``initialize`` caps the threads (NNUNET_SSL_NUM_THREADS) and, on CPU, keeps freed
    memory for reuse (keep_freed_memory) before the trainer's own set-up and switches its modules to channels-last
    after it; ``on_train_epoch_end`` reports the epoch's skipped steps; ``save_checkpoint`` writes in the standard
    memory layout. Steps use ``cpu_autocast``, ``cpu_fast_input`` and ``step_if_finite``;
    :class:`CPUFastSegmentationMixin` gives nnU-Net's own segmentation steps the fast path."""

    cpu_bf16: bool | None = None  # None: on where the device is a CPU with native bf16; env NNUNET_SSL_CPU_BF16
    # float32 on CPU in channels-last layout (bf16 always is: oneDNN's bf16 kernels want it); env ..._CHANNELS_LAST
    cpu_channels_last: bool = True
    cpu_compile: bool = False  # torch.compile the segmentation network on CPU; env NNUNET_SSL_CPU_COMPILE
    # channels-last float32: how instance norms are computed; 'precise' and 'group_norm' keep the layout, 'torch'
    # (instance_norm) copies to the standard layout and back (layout_keeping_instance_norms)
    cpu_channels_last_norm: str = "precise"
    # training on CPU keeps freed memory for reuse (keep_freed_memory); env NNUNET_SSL_CPU_MALLOC
    cpu_keep_freed_memory: bool = True

    @property
    def cpu_fast_path(self) -> bool:
        # resolved on first use (not in __init__), so a caller can still set ``trainer.cpu_bf16`` after building it
        if getattr(self, "_cpu_fast_path", None) is None:
            self._cpu_fast_path, self._cpu_fast_path_reason = resolve_cpu_bf16(self.cpu_bf16, self.device)
        return self._cpu_fast_path

    @property
    def cpu_channels_last_on(self) -> bool:
        """Channels-last layout of weights and inputs: always with bf16, by default in float32 (CPU only)."""
        if self.device.type != "cpu":
            return False
        env = env_flag(CHANNELS_LAST_ENV)
        if env is not None:
            return env or self.cpu_fast_path
        return self.cpu_fast_path or bool(self.cpu_channels_last)

    def cpu_autocast(self):
        return cpu_bf16_autocast(self.cpu_fast_path)

    def cpu_fast_input(self, data: torch.Tensor) -> torch.Tensor:
        return to_channels_last(data) if self.cpu_channels_last_on else data

    def _do_i_compile(self):
        # nnU-Net never compiles on CPU; cpu_compile asks for it (nnUNetTrainer.initialize then compiles the network)
        if self.device.type == "cpu":
            env = env_flag(COMPILE_ENV)
            return bool(self.cpu_compile) if env is None else env
        return super()._do_i_compile()

    def cpu_fast_path_modules(self) -> list[nn.Module]:
        """Modules switched to channels-last (trainers with extra trained modules add theirs)."""
        return [self.network]

    def setup_cpu_fast_path(self) -> None:
        on = self.cpu_fast_path
        self.print_to_log_file(f"CPU fast path (bf16 autocast + channels-last): {'on' if on else 'off'} "
                               f"({self._cpu_fast_path_reason})")
        if self.cpu_channels_last_on:
            modules = [m for m in self.cpu_fast_path_modules() if m is not None]
            if not on:
                n = layout_keeping_instance_norms(modules, self.cpu_channels_last_norm)
                self.print_to_log_file(f"CPU float32 in channels-last layout (cpu_channels_last); {n} instance "
                                       f"norms keep that layout ({self.cpu_channels_last_norm})")
            set_memory_format(modules, channels_last=True)
        if on and getattr(self, "loss", None) is not None and not isinstance(self.loss, Float32Loss):
            self.loss = Float32Loss(self.loss)

    @contextmanager
    def _contiguous_while_saving(self) -> Iterator[None]:
        """Standard layout for the weights and optimizer buffers while nnU-Net's save_checkpoint reads them."""
        if not self.cpu_channels_last_on:
            yield
            return
        modules = [m for m in self.cpu_fast_path_modules() if m is not None]
        states = list(self.optimizer.state.values()) if getattr(self, "optimizer", None) is not None else []
        set_memory_format(modules, channels_last=False)
        for state in states:
            state.update({k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)})
        try:
            yield
        finally:
            set_memory_format(modules, channels_last=True)
            for state in states:
                state.update({k: to_channels_last(v) for k, v in state.items() if isinstance(v, torch.Tensor)})

    # ---- steps with non-finite gradients: one count and one report for segmentation and pretraining trainers ----
    def step_if_finite(self, params, max_norm: float) -> bool:
        """clip_and_step_if_finite on this trainer's optimizer; skipped steps are counted for the epoch's report."""
        if clip_and_step_if_finite(self.optimizer, params, max_norm):
            return True
        self.skipped_steps_epoch = getattr(self, "skipped_steps_epoch", 0) + 1
        return False

    def report_skipped_steps(self, num_steps: int) -> None:
        """Log the epoch's skipped steps and reset the count; more than half of the steps is an error (such a run
        no longer trains). Identical on every DDP rank: the ranks skip on the same all-reduced gradients."""
        skipped, self.skipped_steps_epoch = getattr(self, "skipped_steps_epoch", 0), 0
        if not skipped:
            return
        self.print_to_log_file(f"skipped {skipped} of {num_steps} steps of epoch {self.current_epoch}: "
                               f"non-finite gradients")
        if skipped > num_steps // 2:
            raise FloatingPointError(f"{skipped} of {num_steps} steps of epoch {self.current_epoch} had non-finite "
                                     f"gradients; lower initial_lr, or train in float32 (NNUNET_SSL_CPU_BF16=0)")

    def initialize(self):
        apply_thread_limit(self.print_to_log_file)
        if self.device.type == "cpu":
            keep_freed_memory(self.print_to_log_file, default=self.cpu_keep_freed_memory)
        super().initialize()
        self.setup_cpu_fast_path()

    def on_train_epoch_end(self, train_outputs: list) -> None:
        super().on_train_epoch_end(train_outputs)
        self.report_skipped_steps(len(train_outputs))

    def save_checkpoint(self, filename: str) -> None:
        with self._contiguous_while_saving():
            super().save_checkpoint(filename)


class CPUFastSegmentationMixin(CPUFastPathMixin):
    """The CPU fast path for nnU-Net's own segmentation steps: forward under bf16 autocast, loss in float32
    (Float32Loss), backward outside autocast, the guarded step; no GradScaler (bf16 has float32's exponent range)."""

    def train_step(self, batch: dict) -> dict:
        if not self.cpu_fast_path:  # float32: nnU-Net's own step (on a channels-last input where that is on)
            return super().train_step(dict(batch, data=self.cpu_fast_input(batch["data"])))
        # nnUNetTrainer.train_step with bf16 autocast around forward + loss (Float32Loss) and backward outside it;
        # bf16 has float32's exponent range, so no GradScaler
        data = self.cpu_fast_input(batch["data"].to(self.device))
        target = batch["target"]
        target = [t.to(self.device) for t in target] if isinstance(target, list) else target.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self.cpu_autocast():
            output = self.network(data)
            loss = self.loss(output, target)
        loss.backward()
        self.step_if_finite(self.network.parameters(), 12)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        if not self.cpu_fast_path:
            return super().validation_step(dict(batch, data=self.cpu_fast_input(batch["data"])))
        with self.cpu_autocast():  # no backward here, so nnU-Net's step can run inside the context as it is
            return super().validation_step(dict(batch, data=self.cpu_fast_input(batch["data"])))
