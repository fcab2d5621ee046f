"""CPU fast path (bf16 autocast + channels-last): detection, which setting wins, float32 losses, a real train step
of the plugin's trainers with the path off (exactly nnU-Net's float32 step) and on, and contiguous checkpoints.

Trainers are built from a small in-memory plan (no planning or preprocessing: the steps get synthetic batches), so
the whole file runs in seconds."""
import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from nnunet_ssl.trainers import (
    PDCRUAFSTrainer,
    SpadePretrainTrainer,
    nnUNetTrainerFinetune,
)
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ssl.nnunet import cpu_fast
from nnunet_ssl.nnunet.cpu_fast import (
    ENV_VAR,
    Float32Loss,
    LayoutKeepingInstanceNorm3d,
    cpu_supports_bf16,
    layout_keeping_instance_norms,
    resolve_cpu_bf16,
)

PATCH = 16
NUM_CLASSES = 3
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------- detection / setting
@pytest.mark.parametrize("flags,capability,expected", [
    ("fpu avx512f avx512_bf16 avx512_vnni", "AVX512", True),
    ("fpu avx512f amx_bf16 amx_tile", "AVX512", True),
    ("fpu avx2 avx512f avx512_vnni", "AVX512", False),       # AVX-512 without bf16
    ("fpu avx512f avx512_bf16", "AVX2", False),               # torch limited to AVX2 kernels
])
def test_detection_reads_cpuinfo_flags(tmp_path, flags, capability, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_supports_bf16(str(info), torch_capability=capability) is expected


def test_detection_without_cpuinfo_is_off(tmp_path):
    assert cpu_supports_bf16(str(tmp_path / "missing"), torch_capability="AVX512") is False


def test_setting_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_fast, "_this_cpu_supports_bf16", lambda: True)
    assert resolve_cpu_bf16(None, CPU)[0] is True                   # auto, bf16 CPU
    assert resolve_cpu_bf16(False, CPU)[0] is False                 # class attribute beats auto
    assert resolve_cpu_bf16(True, torch.device("cuda"))[0] is False  # never on other devices
    monkeypatch.setattr(cpu_fast, "_this_cpu_supports_bf16", lambda: False)
    assert resolve_cpu_bf16(None, CPU)[0] is False                  # auto, CPU without bf16
    monkeypatch.setenv(ENV_VAR, "1")
    assert resolve_cpu_bf16(False, CPU)[0] is True                  # the environment beats the attribute
    monkeypatch.setenv(ENV_VAR, "0")
    assert resolve_cpu_bf16(True, CPU)[0] is False
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_cpu_bf16(None, CPU)


def test_float32_loss_on_bf16_deep_supervision_outputs():
    torch.manual_seed(0)
    loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False,
                                                  "ddp": False}, {}, weight_ce=1, weight_dice=1,
                                                 dice_class=MemoryEfficientSoftDiceLoss), [1.0, 0.5])
    logits = [torch.randn(2, NUM_CLASSES, 8, 8, 8), torch.randn(2, NUM_CLASSES, 4, 4, 4)]
    target = [torch.randint(0, NUM_CLASSES, (2, 1, 8, 8, 8)).float(),
              torch.randint(0, NUM_CLASSES, (2, 1, 4, 4, 4)).float()]
    bf16 = [x.bfloat16() for x in logits]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss(bf16, target)
        wrapped = Float32Loss(loss)(bf16, target)
    reference = loss([x.float() for x in bf16], target)
    assert wrapped.dtype == torch.float32 and wrapped.item() == reference.item()
    # without the wrapper parts of nnU-Net's loss (the Dice term's softmax) run in bf16 under autocast
    assert plain.item() != reference.item()


# ---------------------------------------------------------------------------------------------- tiny trainers
def _plans() -> dict:
    conf = {
        "data_identifier": "tiny_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [PATCH] * 3, "median_image_size_in_voxels": [24.0] * 3, "spacing": [1.0] * 3,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                            "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False}
    return {"dataset_name": "Dataset997_CpuFast", "plans_name": "tiny", "original_median_spacing_after_transp": [1.0] * 3,
            "original_median_shape_after_transp": [24] * 3, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": conf},
            "experiment_planner_used": "test", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {
                "max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0,
                "std": 1.0}},
            "continue_training": False}


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
                "file_ending": ".nii.gz"}


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch):
    pre = tmp_path / "preprocessed"
    (pre / "Dataset997_CpuFast" / "tiny_3d_fullres").mkdir(parents=True)
    (pre / "Dataset997_CpuFast" / "tiny_3d_fullres" / "case.b2nd").touch()  # lets nnU-Net infer its dataset class
    monkeypatch.setenv("nnUNet_preprocessed", str(pre))  # nnU-Net 2.8 reads its paths from the environment on use
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    return tmp_path


def _trainer(cls, cpu_bf16: bool, seed: int = 0):
    torch.manual_seed(seed)
    tr = cls(_plans(), "3d_fullres", 0, DATASET_JSON, CPU)
    tr.cpu_bf16 = cpu_bf16
    tr.initialize()
    return tr


def _segmentation_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (2, 1, PATCH, PATCH, PATCH), generator=g).float()
    targets = [labels, labels[:, :, ::2, ::2, ::2].contiguous(), labels[:, :, ::4, ::4, ::4].contiguous()]
    return {"data": torch.randn(2, 1, PATCH, PATCH, PATCH, generator=g), "target": targets, "keys": ["a", "b"]}


def _pretraining_batch(seed: int = 1) -> dict:
    """Two cases x two views (view-major rows), the second view shifted by 3 voxels: the metadata Spade reads."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(PATCH, dtype=torch.float32)] * 3, indexing="ij"))
    shifts = torch.tensor([[0.0, 0, 0], [20, 20, 20], [3, 0, 0], [23, 20, 20]])  # rows: case 0, case 1 (view 0, 1)
    coords = grid[None] + shifts[:, :, None, None, None]
    scale = torch.full((4, 3), 1 / 48)
    return {"data": torch.randn(4, 1, PATCH, PATCH, PATCH, generator=g), "coords": coords,
            "valid": torch.ones(4, PATCH, PATCH, PATCH, dtype=torch.bool), "sample_index": torch.tensor([0, 1, 0, 1]),
            "canonical_scale": scale, "canonical_offset": torch.zeros(4, 3),
            "canonical_center": (shifts + (PATCH - 1) / 2) * scale, "keys": ["a", "b", "a", "b"]}


def _record_forward(module, seen: list):
    """Remember autocast state and output dtypes of every forward of ``module``."""
    def hook(_mod, _inp, out):
        outs = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]
        seen.append((torch.is_autocast_enabled("cpu"), {o.dtype for o in outs}))
    return module.register_forward_hook(hook)


def _conv_weights(module):
    return [p for p in module.parameters() if p.ndim == 5]


def test_finetune_fast_path_off_is_nnunets_float32_step(nnunet_dirs):
    # standard layout (the float32 default is channels-last: test_channels_last_float32_is_the_float32_step)
    ours = _fp32_trainer(nnUNetTrainerFinetune, channels_last=False, compile_=False)
    stock = _fp32_trainer(nnUNetTrainerFinetune, channels_last=False, compile_=False)  # same seed: same weights
    seen = []
    _record_forward(ours.network, seen)
    out = ours.train_step(_segmentation_batch())
    ref = nnUNetTrainer.train_step(stock, _segmentation_batch())  # nnU-Net's own step, bypassing the mixin
    assert seen == [(False, {torch.float32})]
    assert not isinstance(ours.loss, Float32Loss)
    assert out["loss"] == ref["loss"]
    for a, b in zip(ours.network.parameters(), stock.network.parameters()):
        assert torch.equal(a, b) and a.is_contiguous()
    with open(ours.log_file) as log:
        assert "CPU fast path (bf16 autocast + channels-last): off (cpu_bf16 = False)" in log.read()


@pytest.mark.parametrize("cls", [nnUNetTrainerFinetune, PDCRUAFSTrainer])
def test_segmentation_fast_path_on(nnunet_dirs, cls):
    tr = _trainer(cls, cpu_bf16=True)
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in _conv_weights(tr.network))
    # bf16 keeps torch's instance_norm (the faster kernel in bf16)
    norms = [m for m in tr.network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is torch.nn.InstanceNorm3d for m in norms)
    before = copy.deepcopy(tr.network.state_dict())
    seen, losses = [], []
    _record_forward(tr.network, seen)
    step_loss = tr.loss

    def recording_loss(output, target):
        value = step_loss(output, target)
        losses.append((value, [o.detach() for o in output], target))
        return value

    tr.loss = recording_loss
    out = tr.train_step(_segmentation_batch())
    assert seen[0] == (True, {torch.bfloat16})  # the forward ran under bf16 autocast
    # the step's loss is nnU-Net's Dice+CE computed in float32 from the bf16 logits
    (value, output, target), = losses
    assert value.dtype == torch.float32
    assert value.item() == tr._build_loss()([o.float() for o in output], target).item()
    assert np.isfinite(out["loss"]) and all(np.isfinite(v) for v in out.values())
    grads = [p.grad for p in tr.network.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(not torch.equal(before[k], v) for k, v in tr.network.state_dict().items())
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in _conv_weights(tr.network))
    tr.network.eval()
    val = tr.validation_step(_segmentation_batch(seed=2))
    assert np.isfinite(val["loss"]) and len(val["tp_hard"]) == NUM_CLASSES - 1
    with open(tr.log_file) as log:
        assert "CPU fast path (bf16 autocast + channels-last): on (cpu_bf16 = True)" in log.read()


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_pretraining_step_both_ways(nnunet_dirs, cpu_bf16):
    tr = _trainer(SpadePretrainTrainer, cpu_bf16=cpu_bf16)
    seen, loss_dtypes = [], []
    _record_forward(tr.model, seen)
    compute_loss = tr.compute_loss

    def recording_compute_loss(outputs, batch):
        loss, terms = compute_loss(outputs, batch)
        loss_dtypes.append(loss.dtype)
        return loss, terms

    tr.compute_loss = recording_compute_loss
    out = tr.train_step(_pretraining_batch())
    dtype = torch.bfloat16 if cpu_bf16 else torch.float32
    assert seen == [(cpu_bf16, {dtype})]
    assert loss_dtypes == [torch.float32]
    assert np.isfinite(out["loss"]) and np.isfinite(out["local"]) and np.isfinite(out["global"])
    grads = [p.grad for p in list(tr.network.parameters()) + list(tr.heads.parameters()) if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # channels-last either way: always with bf16, by default in float32
    fmt = torch.channels_last_3d
    assert all(w.is_contiguous(memory_format=fmt) for w in _conv_weights(tr.network) + _conv_weights(tr.heads))


@pytest.mark.parametrize("cls,batch", [(nnUNetTrainerFinetune, _segmentation_batch),
                                       (PDCRUAFSTrainer, _segmentation_batch),
                                       (SpadePretrainTrainer, _pretraining_batch)])
def test_checkpoints_of_fast_path_are_contiguous(nnunet_dirs, cls, batch):
    tr = _trainer(cls, cpu_bf16=True)
    tr.train_step(batch())  # optimizer momentum buffers now exist, in channels-last layout
    f = nnunet_dirs / "checkpoint.pth"
    tr.save_checkpoint(str(f))
    ckpt = torch.load(f, map_location="cpu", weights_only=False)
    tensors = list(ckpt["network_weights"].values())
    tensors += [v for s in ckpt["optimizer_state"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert any(t.ndim == 5 for t in tensors)
    assert all(t.is_contiguous() for t in tensors)
    # training goes on in channels-last layout, and a stock (contiguous) network takes the weights as they are
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in _conv_weights(tr.network))
    fresh = _trainer(cls, cpu_bf16=False)
    fresh.network.load_state_dict(ckpt["network_weights"])
    for k, v in fresh.network.state_dict().items():
        assert torch.equal(v, ckpt["network_weights"][k])


def test_a_step_with_non_finite_gradients_is_skipped_not_taken():
    from nnunet_ssl.nnunet.cpu_fast import clip_and_step_if_finite
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    w.grad = torch.tensor([float("nan"), 1.0])
    assert not clip_and_step_if_finite(opt, [w], 12.0)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0])) and w.grad is None
    w.grad = torch.tensor([30.0, 40.0])  # norm 50, clipped to 10
    assert clip_and_step_if_finite(opt, [w], 10.0)
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.5 * 6.0, 2.0 - 0.5 * 8.0]))


def test_skipped_steps_are_counted_per_epoch_and_too_many_fail():
    from nnunet_ssl.nnunet.cpu_fast import CPUFastPathMixin

    class Stub(CPUFastPathMixin):
        current_epoch = 3

        def __init__(self):
            self.w = torch.nn.Parameter(torch.tensor([1.0]))
            self.optimizer = torch.optim.SGD([self.w], lr=0.1)
            self.log = []

        def print_to_log_file(self, *args):
            self.log.append(" ".join(str(a) for a in args))

        def step(self, grad):
            self.w.grad = torch.tensor([grad])
            return self.step_if_finite([self.w], 12.0)

    t = Stub()
    assert [t.step(g) for g in (1.0, float("inf"), 1.0, 1.0)] == [True, False, True, True]
    t.report_skipped_steps(4)
    assert t.log == ["skipped 1 of 4 steps of epoch 3: non-finite gradients"]
    t.report_skipped_steps(4)  # the count starts again each epoch
    assert len(t.log) == 1
    for g in (float("nan"), float("nan"), float("nan"), 1.0):
        t.step(g)
    with pytest.raises(FloatingPointError, match="3 of 4 steps of epoch 3 had non-finite gradients"):
        t.report_skipped_steps(4)


def test_thread_limit_caps_torch_threads(monkeypatch):
    from nnunet_ssl.nnunet.cpu_fast import apply_thread_limit
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("NNUNET_SSL_NUM_THREADS", "1")
        torch.set_num_threads(2)  # what nnUNetv2_train does on a 2-core CPU
        apply_thread_limit()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("NNUNET_SSL_NUM_THREADS", "zero")
        with pytest.raises(ValueError, match="positive number of threads"):
            apply_thread_limit()
        monkeypatch.delenv("NNUNET_SSL_NUM_THREADS")
        torch.set_num_threads(2)
        apply_thread_limit()  # unset: nnU-Net's choice stays
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)



_PAGE_FAULTS_OF_A_STEP = """
import ctypes, math, mmap, resource, sys, torch
from nnunet_ssl.nnunet.cpu_fast import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def free_in_heap():  # bytes free in the main arena's heap (glibc >= 2.33), nan without mallinfo2
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        f = libc.mallinfo2
    except AttributeError:
        return math.nan
    f.restype = Mallinfo2
    return float(f().fordblks)

def transient():  # a step's transient memory: 30 blocks of 4 MiB, written, then all freed
    blocks = [libc.malloc(4 << 20) for _ in range(30)]
    for b in blocks:
        ctypes.memset(b, 1, 4 << 20)
    for b in blocks:
        libc.free(b)

def tensors():  # the same through torch's CPU allocator
    blocks = [torch.empty(1 << 20).fill_(1.0) for _ in range(30)]
    for b in blocks:
        b.add_(1.0)

def faults_per_round(work):
    for _ in range(2):
        work()
    before = faults()
    for _ in range(3):
        work()
    return (faults() - before) / 3 if counted else math.nan

# does this kernel count minor faults at all? (some sandboxes report none): 64 MiB of fresh pages, touched
before = faults()
fresh = mmap.mmap(-1, 64 << 20)
for i in range(0, 64 << 20, 4096):
    fresh[i] = 1
counted = faults() - before > 8000
print(faults_per_round(transient), free_in_heap(), faults_per_round(tensors))
torch.manual_seed(0)  # and a small training step: its numbers
norm = lambda: torch.nn.InstanceNorm3d(8, affine=True)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), norm(), torch.nn.LeakyReLU(inplace=True),
                          torch.nn.Conv3d(8, 8, 3, padding=1), norm(), torch.nn.LeakyReLU(inplace=True),
                          torch.nn.Conv3d(8, 2, 1))
for _ in range(3):
    net.zero_grad(set_to_none=True)
    net(torch.randn(2, 1, 16, 24, 16)).square().mean().backward()
print(repr([p.grad.double().sum().item() for p in net.parameters()]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc only")
def test_keeping_freed_memory_removes_the_page_faults_of_repeated_steps():
    # a fresh process each (the setting is process-wide), glibc's defaults against keep_freed_memory: with the
    # defaults each round of 120 MiB of blocks is handed back when freed (the heap keeps < 32 MiB free) and faults
    # in again (~30 000 pages; a CPU-budget training step took 3 400-19 400); kept, the heap keeps the 120 MiB and
    # the pages are reused. The round is allocated with malloc itself, nothing allocated between its blocks: with
    # torch's tensors the defaults' outcome varies from run to run (small chunks of torch's aligned allocations
    # and tensor objects land between the blocks at times and keep the heap from shrinking), so only the kept
    # case is asserted for tensors. Where the kernel counts no minor faults (some sandboxes), the heap's free
    # bytes still tell; glibc's tunables are removed from the environment so that "defaults" means glibc's.
    def run(env_value):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
        env.update(NNUNET_SSL_CPU_MALLOC=env_value, OMP_NUM_THREADS="1")
        out = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_OF_A_STEP], env=env, capture_output=True,
                             text=True, timeout=300, check=True).stdout.split()
        return out[0] == "True", float(out[1]), float(out[2]), float(out[3]), out[4:]
    kept_off, default_faults, default_free, _, grads_default = run("0")
    kept_on, kept_faults, kept_free, kept_tensor_faults, grads_kept = run("1")
    if not kept_on:
        pytest.skip("the C library is not glibc")
    assert not kept_off
    measured = [m for m in (default_faults, default_free) if not math.isnan(m)]
    if not measured:
        pytest.skip("neither minor page faults nor glibc's mallinfo2 can be read here")
    if not math.isnan(default_free):
        assert default_free < 32 * 2**20 <= 120 * 2**20 <= kept_free  # handed back / kept for reuse
    if not math.isnan(default_faults):
        assert default_faults > 10_000  # the cost this setting removes
        assert kept_faults < 100
        assert kept_tensor_faults < 100  # torch's blocks reuse the kept pages too
    assert grads_kept == grads_default  # where memory comes from changes no number of a step


def test_cpu_trainers_keep_freed_memory_unless_switched_off(monkeypatch):
    from nnunet_ssl.nnunet.cpu_fast import CPUFastPathMixin
    calls = []
    # the real decision (environment, class attribute, device); only the process-wide mallopt calls are counted
    monkeypatch.setattr(cpu_fast, "_apply_keep_freed_memory", lambda: calls.append(1) or True)

    class Base:
        def initialize(self):
            pass

    class Stub(CPUFastPathMixin, Base):
        def __init__(self, device):
            self.device = torch.device(device)

        def print_to_log_file(self, *args):
            pass

        def setup_cpu_fast_path(self):
            pass

    monkeypatch.delenv("NNUNET_SSL_CPU_MALLOC", raising=False)
    Stub("cpu").initialize()
    assert len(calls) == 1
    Stub("meta").initialize()  # not a CPU training (CUDA, MPS): glibc's malloc does not hold its tensors
    assert len(calls) == 1
    off = Stub("cpu")
    off.cpu_keep_freed_memory = False
    off.initialize()
    assert len(calls) == 1
    monkeypatch.setenv("NNUNET_SSL_CPU_MALLOC", "1")  # the environment wins over the class attribute
    off.initialize()
    assert len(calls) == 2
    monkeypatch.setenv("NNUNET_SSL_CPU_MALLOC", "0")
    Stub("cpu").initialize()
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------- float32 options
def _fp32_trainer(cls, channels_last: bool, compile_: bool, seed: int = 0):
    torch.manual_seed(seed)
    tr = cls(_plans(), "3d_fullres", 0, DATASET_JSON, CPU)
    tr.cpu_bf16, tr.cpu_channels_last, tr.cpu_compile = False, channels_last, compile_
    tr.initialize()
    return tr


def _step_and_grads(tr, batch):
    out = tr.train_step(batch)
    net = getattr(tr.network, "_orig_mod", tr.network)
    return out["loss"], {n: p.detach().clone() for n, p in net.named_parameters()}


def _assert_same_step(a, b, rtol):
    """Same loss and the same updated weights after one step (the update is lr x the clipped gradient + momentum,
    so equal weights mean equal gradients), each within ``rtol`` of the weights' scale."""
    assert a[0] == pytest.approx(b[0], rel=rtol)
    for n in a[1]:
        scale = a[1][n].abs().max().clamp_min(1e-6)
        assert (a[1][n] - b[1][n]).abs().max() <= rtol * scale, n


def test_channels_last_float32_is_the_float32_step(nnunet_dirs):
    """cpu_channels_last in float32 (the default): weights and inputs in channels-last layout, nnU-Net's float32 step
    otherwise; loss and updated weights equal the contiguous step's within 1e-4 (relative; oneDNN picks other
    kernels). The environment variable wins over the class attribute."""
    eager = _fp32_trainer(nnUNetTrainerFinetune, channels_last=False, compile_=False)
    cl = _trainer(nnUNetTrainerFinetune, cpu_bf16=False)  # the default
    assert cl.cpu_channels_last is True
    assert all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in _conv_weights(cl.network))
    assert not isinstance(cl.loss, Float32Loss) and not cl.cpu_fast_path
    norms = [m for m in cl.network.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(type(m) is LayoutKeepingInstanceNorm3d and m.kernel == "precise" for m in norms)
    _assert_same_step(_step_and_grads(cl, _segmentation_batch()), _step_and_grads(eager, _segmentation_batch()), 1e-4)
    with open(cl.log_file) as log:
        assert "channels-last layout (cpu_channels_last)" in log.read()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNUNET_SSL_CPU_CHANNELS_LAST", "0")
        assert not cl.cpu_channels_last_on and not eager.cpu_channels_last_on
        mp.setenv("NNUNET_SSL_CPU_CHANNELS_LAST", "1")
        assert cl.cpu_channels_last_on and eager.cpu_channels_last_on


def _norm_and_grads(norm, x, grad):
    x = x.clone().requires_grad_()
    y = norm(x)
    y.backward(grad)
    params = [p.grad for p in (norm.weight, norm.bias) if p is not None]
    return [y.detach(), x.grad] + params


@pytest.mark.parametrize("dims,affine", [(3, True), (3, False), (2, True)])
@pytest.mark.parametrize("kernel", ["precise", "group_norm"])
def test_layout_keeping_instance_norm_equals_instance_norm(dims, affine, kernel):
    """The layout-keeping forms of an instance norm: output and gradients (input, weight, bias) equal nn.InstanceNorm's
    in float64 within float32 rounding (rel 1e-5); a channels-last input stays channels-last; state-dict keys
    unchanged; unbatched inputs and norms with running statistics keep instance_norm."""
    norm_cls = {3: torch.nn.InstanceNorm3d, 2: torch.nn.InstanceNorm2d}[dims]
    fmt = {3: torch.channels_last_3d, 2: torch.channels_last}[dims]
    shape = (2, 5) + (7, 6, 5)[:dims]
    torch.manual_seed(0)
    ref = norm_cls(5, affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5), ref.bias.normal_()
    ours = copy.deepcopy(ref).float()
    keys = list(ours.state_dict())
    assert layout_keeping_instance_norms([torch.nn.Sequential(ours)], kernel) == 1 and type(ours) is not norm_cls
    assert list(ours.state_dict()) == keys
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).contiguous(memory_format=fmt)
    grad = torch.randn(shape, dtype=torch.float64)
    expected = _norm_and_grads(ref, x, grad)
    got = _norm_and_grads(ours, x.float().contiguous(memory_format=fmt), grad.float())
    assert got[0].is_contiguous(memory_format=fmt)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)
    unbatched = torch.randn(shape[1:])
    torch.testing.assert_close(ours(unbatched), torch.nn.functional.instance_norm(
        unbatched[None], weight=ours.weight, bias=ours.bias, eps=ours.eps)[0])
    tracking = norm_cls(5, track_running_stats=True)
    assert layout_keeping_instance_norms([tracking], kernel) == 0 and type(tracking) is norm_cls
    plain = norm_cls(5)
    assert layout_keeping_instance_norms([plain], "torch") == 0 and type(plain) is norm_cls
    with pytest.raises(ValueError, match="cpu_channels_last_norm must be one of"):
        layout_keeping_instance_norms([plain], "welford")


def test_precise_layout_keeping_norm_is_as_precise_as_instance_norm():
    """On a full-resolution CPU-budget activation (2 x 8 x 32 x 48 x 32, mean/std 1.5) the 'precise' kernel's output
    and gradients stay within 1e-6 (relative to the largest entry) of float64, as torch's instance_norm does (~1e-7);
    group_norm's one-pass channels-last sums miss that by two orders of magnitude (~1e-5), the reason it is not the
    default."""
    torch.manual_seed(0)
    shape = (2, 8, 32, 48, 32)
    ref = torch.nn.InstanceNorm3d(8, affine=True).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.normal_()
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    grad = torch.randn(shape, dtype=torch.float64)
    expected = _norm_and_grads(ref, x, grad)
    x32 = x.float().contiguous(memory_format=torch.channels_last_3d)
    errors = {}
    for kernel in ("precise", "group_norm"):
        ours = copy.deepcopy(ref).float()
        layout_keeping_instance_norms([ours], kernel)
        got = _norm_and_grads(ours, x32, grad.float().contiguous(memory_format=torch.channels_last_3d))
        errors[kernel] = max(((g.double() - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected))
    assert errors["precise"] < 1e-6 < errors["group_norm"], errors


@pytest.mark.slow
def test_compiled_float32_step_equals_the_eager_step(nnunet_dirs):
    """cpu_compile: nnU-Net's initialize compiles the network (it never does on CPU by itself); loss and updated
    weights of a step equal the eager step's within 1e-4 (relative; inductor fuses and reorders float32 sums)."""
    from torch._dynamo import OptimizedModule
    eager = _fp32_trainer(nnUNetTrainerFinetune, channels_last=False, compile_=False)
    compiled = _fp32_trainer(nnUNetTrainerFinetune, channels_last=False, compile_=True)
    assert isinstance(compiled.network, OptimizedModule) and not isinstance(eager.network, OptimizedModule)
    _assert_same_step(_step_and_grads(compiled, _segmentation_batch()), _step_and_grads(eager, _segmentation_batch()),
                      1e-4)
