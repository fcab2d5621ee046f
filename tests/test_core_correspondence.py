import itertools

import pytest
import torch

from conftest import voxel_grid as _grid

from nnunet_ssl.core.correspondence import (argmin_last, feature_grid, gather_at, sample_coords,
                                             sample_correspondences)


def _flipped_shifted(shape, axis, shift, offset):
    """View b: voxel u shows the position of view-a voxel (flip_axis(u) + shift)."""
    g = _grid(shape, offset)
    g = torch.flip(g, dims=[1 + axis])
    g[axis] = g[axis] + shift
    return g


def _expected_b_index(coords_a, coords_b, valid_b):
    """For each a voxel (flat index), the flat index of the b voxel showing exactly its position."""
    pa = coords_a.reshape(3, -1).t().tolist()
    pb = coords_b.reshape(3, -1).t().tolist()
    vb = valid_b.reshape(-1).tolist()
    lookup = {tuple(p): j for j, p in enumerate(pb) if vb[j]}
    return [lookup.get(tuple(p), -1) for p in pa]


def _build_case(shape, seed, p_valid=0.8):
    g = torch.Generator().manual_seed(seed)
    nd = len(shape)
    items = [(0, 2, (100.0, 50.0, 7.0)), (nd - 1, -1, (3.0, 200.0, 40.0))]
    ca, cb, va, vb = [], [], [], []
    for axis, shift, offset in items:
        ca.append(_grid(shape, offset))
        cb.append(_flipped_shifted(shape, axis, shift, offset))
        va.append(torch.rand(shape, generator=g) < p_valid)
        vb.append(torch.rand(shape, generator=g) < p_valid)
    return torch.stack(ca), torch.stack(va), torch.stack(cb), torch.stack(vb)


def _check_exact(out, ca, va, cb, vb, k, expect_full=None):
    bsz = ca.shape[0]
    for key in ("index_a", "index_b", "mask", "distance"):
        assert out[key].shape == (bsz, k)
    assert out["index_a"].dtype == torch.long and out["index_b"].dtype == torch.long
    assert out["mask"].dtype == torch.bool
    for b in range(bsz):
        expected = _expected_b_index(ca[b], cb[b], vb[b])
        va_flat = va[b].reshape(-1)
        matched = [i for i, j in enumerate(expected) if j >= 0 and va_flat[i]]
        m = out["mask"][b]
        ia = out["index_a"][b][m].tolist()
        ib = out["index_b"][b][m].tolist()
        assert len(set(ia)) == len(ia), "index_a must be distinct"
        for i, j in zip(ia, ib):
            assert va_flat[i]
            assert vb[b].reshape(-1)[j]
            assert expected[i] == j
        assert torch.all(out["distance"][b][m].abs() < 1e-4)
        # Valid slots come first (topk ordering) and the count is as large as possible.
        n_ok = int(m.sum())
        assert bool(m[:n_ok].all()) and not bool(m[n_ok:].any())
        if expect_full:
            assert n_ok == min(k, len(matched))


@pytest.mark.parametrize("shape", [(6, 5, 4), (9, 7)])
def test_flip_shift_exact_all_candidates(shape):
    ca, va, cb, vb = _build_case(shape, seed=0)
    k = 20
    out = sample_correspondences(ca, va, cb, vb, k, tolerance=0.5, candidate_factor=None,
                                 generator=torch.Generator().manual_seed(1))
    _check_exact(out, ca, va, cb, vb, k, expect_full=True)
    assert out["mask"].all()


@pytest.mark.parametrize("shape", [(6, 5, 4), (9, 7)])
def test_flip_shift_exact_default_candidates(shape):
    ca, va, cb, vb = _build_case(shape, seed=2)
    k = 8
    out = sample_correspondences(ca, va, cb, vb, k, tolerance=0.5,
                                 generator=torch.Generator().manual_seed(3))
    _check_exact(out, ca, va, cb, vb, k)
    assert out["mask"].sum() > 0


def test_axis_permutation_3d():
    # View b is view a transposed in (y, z): voxel (x, y, z) of b shows a's (x, z, y).
    shape = (4, 5, 5)
    ca = _grid(shape, (10.0, 20.0, 30.0))[None]
    cb = ca.transpose(3, 4).contiguous()
    va = torch.ones(1, *shape, dtype=torch.bool)
    vb = va.clone()
    k = 4 * 5 * 5
    out = sample_correspondences(ca, va, cb, vb, k, tolerance=0.1, candidate_factor=None)
    assert out["mask"].all()
    ia, ib = out["index_a"][0], out["index_b"][0]
    x, y, z = ia // 25, (ia // 5) % 5, ia % 5
    assert torch.equal(ib, x * 25 + z * 5 + y)
    assert sorted(ia.tolist()) == list(range(k))


def test_too_few_valid_voxels_masked():
    shape = (5, 5, 5)
    ca = _grid(shape)[None].repeat(2, 1, 1, 1, 1)
    cb = ca.clone()
    va = torch.zeros(2, *shape, dtype=torch.bool)
    va[0, 1, 2, 3] = va[0, 4, 4, 4] = va[0, 0, 0, 0] = True  # 3 valid a voxels in item 0
    vb = torch.ones(2, *shape, dtype=torch.bool)
    vb[1] = False  # item 1: nothing valid in view b
    va[1] = True
    out = sample_correspondences(ca, va, cb, vb, 10, tolerance=0.5)
    assert out["mask"][0].sum() == 3
    assert sorted(out["index_a"][0][out["mask"][0]].tolist()) == [0, 1 * 25 + 2 * 5 + 3, 124]
    assert torch.equal(out["index_a"][0][out["mask"][0]], out["index_b"][0][out["mask"][0]])
    assert not out["mask"][1].any()


def test_more_samples_than_voxels_pads():
    shape = (2, 3)
    ca = _grid(shape)[None]
    out = sample_correspondences(ca, torch.ones(1, *shape, dtype=torch.bool), ca.clone(),
                                 torch.ones(1, *shape, dtype=torch.bool), 10, tolerance=0.5)
    assert out["mask"].shape == (1, 10)
    assert out["mask"].sum() == 6
    m = out["mask"][0]
    assert torch.equal(out["index_a"][0][m], out["index_b"][0][m])


def test_tolerance_respected():
    shape = (4, 4, 4)
    ca = _grid(shape, (5.0, 5.0, 5.0))[None]
    cb = ca + 0.3
    v = torch.ones(1, *shape, dtype=torch.bool)
    out = sample_correspondences(ca, v, cb, v.clone(), 16, tolerance=0.3 * 3 ** 0.5 - 1e-3)
    assert not out["mask"].any()
    out = sample_correspondences(ca, v, cb, v.clone(), 16, tolerance=0.6)
    assert out["mask"].all()
    assert torch.equal(out["index_a"], out["index_b"])
    torch.testing.assert_close(out["distance"], torch.full((1, 16), 0.3 * 3 ** 0.5))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_nearest(seed):
    g = torch.Generator().manual_seed(seed)
    bsz, shape = 3, (6, 5, 4)
    n = 6 * 5 * 4
    ca = torch.rand(bsz, 3, *shape, generator=g) * 6 + 40
    cb = torch.rand(bsz, 3, *shape, generator=g) * 6 + 40
    va = torch.rand(bsz, *shape, generator=g) < 0.7
    vb = torch.rand(bsz, *shape, generator=g) < 0.7
    tol, k = 0.8, 15
    out = sample_correspondences(ca, va, cb, vb, k, tol, generator=g, candidate_factor=None)
    pa = ca.reshape(bsz, 3, n).transpose(1, 2).double()
    pb = cb.reshape(bsz, 3, n).transpose(1, 2).double()
    d = torch.cdist(pa, pb).masked_fill(~vb.reshape(bsz, 1, n), float("inf"))
    dmin, amin = d.min(dim=2)
    for b in range(bsz):
        matched = va.reshape(bsz, n)[b] & (dmin[b] <= tol)
        m = out["mask"][b]
        assert int(m.sum()) == min(k, int(matched.sum()))
        ia, ib = out["index_a"][b][m], out["index_b"][b][m]
        assert matched[ia].all()
        assert torch.equal(ib, amin[b][ia])
        torch.testing.assert_close(out["distance"][b][m].double(), dmin[b][ia], rtol=1e-5, atol=1e-5)
        assert len(set(ia.tolist())) == len(ia)


def test_invalid_voxels_with_nonfinite_coords_ignored():
    shape = (4, 4)
    ca = _grid(shape)[None]
    cb = ca.clone()
    va = torch.ones(1, *shape, dtype=torch.bool)
    vb = va.clone()
    va[0, 0] = False
    vb[0, 3] = False
    ca[0, :, 0] = float("nan")
    cb[0, :, 3] = float("inf")
    out = sample_correspondences(ca, va, cb, vb, 16, tolerance=0.5, candidate_factor=None)
    m = out["mask"][0]
    assert int(m.sum()) == 8  # rows 1 and 2
    assert torch.equal(out["index_a"][0][m], out["index_b"][0][m])
    assert set((out["index_a"][0][m] // 4).tolist()) == {1, 2}


def test_generator_reproducible_and_random():
    ca, va, cb, vb = _build_case((6, 6, 6), seed=4)
    o1 = sample_correspondences(ca, va, cb, vb, 5, 0.5, generator=torch.Generator().manual_seed(7))
    o2 = sample_correspondences(ca, va, cb, vb, 5, 0.5, generator=torch.Generator().manual_seed(7))
    o3 = sample_correspondences(ca, va, cb, vb, 5, 0.5, generator=torch.Generator().manual_seed(8))
    for key in o1:
        assert torch.equal(o1[key], o2[key])
    assert not torch.equal(o1["index_a"], o3["index_a"])


def test_gather_at():
    fm = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    idx = torch.tensor([[0, 7, 19], [3, 3, 12]])
    out = gather_at(fm, idx)
    assert out.shape == (2, 3, 3)
    for b, k in itertools.product(range(2), range(3)):
        i = idx[b, k].item()
        torch.testing.assert_close(out[b, k], fm[b, :, i // 5, i % 5])
    fm3 = torch.randn(2, 4, 3, 4, 5, requires_grad=True)
    out3 = gather_at(fm3, idx)
    torch.testing.assert_close(out3[1, 2], fm3[1, :, 0, 2, 2])
    out3.sum().backward()
    assert fm3.grad.sum() == 2 * 3 * 4


def _affine_field(shape, seed):
    g = torch.Generator().manual_seed(seed)
    nd = len(shape)
    A = torch.randn(3, nd, generator=g, dtype=torch.float64)
    t = torch.randn(3, generator=g, dtype=torch.float64) * 10
    axes = [torch.arange(s, dtype=torch.float64) for s in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (nd, *shape)
    return torch.einsum("cd,d...->c...", A, idx) + t.view(3, *([1] * nd)), A, t


@pytest.mark.parametrize("shape,scale,offset", [((8, 6, 4), (2, 2, 1), (0, 0, 0)), ((8, 6, 4), (1, 2, 2), (0, 0, 0)),
                                                ((8, 6, 4), (2, 2, 2), (0.5, 0.5, 0.5)), ((6, 9), (2, 3), (0, 1))])
def test_sample_coords_reads_affine_fields_exactly_at_the_centres(shape, scale, offset):
    field, A, t = _affine_field(shape, seed=len(shape))
    coords = field[None].float()
    valid = torch.ones(1, *shape, dtype=torch.bool)
    out_shape = tuple(-(-s // int(f)) for s, f in zip(shape, scale))
    c2, v2 = sample_coords(coords, valid, scale, offset, out_shape)
    assert c2.shape == (1, 3, *out_shape) and v2.shape == (1, *out_shape)
    axes = [torch.arange(n, dtype=torch.float64) * f + o for n, f, o in zip(out_shape, scale, offset)]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    expected = torch.einsum("cd,d...->c...", A, centres) + t.view(3, *([1] * len(shape)))
    inside = torch.ones(out_shape, dtype=torch.bool)
    for d, ax in enumerate(axes):  # a centre past the last voxel (offset 0.5 on the last block) is invalid
        view = [1] * len(shape)
        view[d] = -1
        inside = inside & (ax <= shape[d] - 1).view(view)
    assert torch.equal(v2[0], inside)
    torch.testing.assert_close(c2[0].double()[:, inside], expected[:, inside], rtol=0, atol=1e-4)


@pytest.mark.parametrize("scale,offset,out_shape", [((2, 2, 1), (0, 0, 0), (4, 3, 4)), ((1, 2, 2), (0, 1, 1), (8, 3, 2)),
                                                    ((2, 2, 2), (1, 1, 1), (4, 3, 2)),
                                                    ((2, 2, 2), (1, 1, 1), (4, 3, 3))])  # last centre past the crop
def test_sample_coords_on_whole_voxels_reads_them_exactly(scale, offset, out_shape):
    """Centres on whole voxels (nnU-Net's strides) read the voxel itself, bit for bit, from any field (not only
    affine ones); a centre outside the crop is invalid. Reference: one voxel at a time."""
    import itertools
    g = torch.Generator().manual_seed(0)
    size = (8, 6, 4)
    coords = torch.randn(2, 3, *size, generator=g) * 100
    valid = torch.rand(2, *size, generator=g) > 0.2
    c2, v2 = sample_coords(coords, valid, scale, offset, out_shape)
    assert c2.shape == (2, 3, *out_shape) and v2.shape == (2, *out_shape)
    for i in itertools.product(*map(range, out_shape)):
        src = tuple(o + s * j for j, s, o in zip(i, scale, offset))
        if all(0 <= x <= n - 1 for x, n in zip(src, size)):
            assert torch.equal(c2[(slice(None), slice(None)) + i], coords[(slice(None), slice(None)) + src])
            assert torch.equal(v2[(slice(None),) + i], valid[(slice(None),) + src])
        else:
            assert not v2[(slice(None),) + i].any()


def test_sample_coords_validity_follows_the_voxels_read():
    valid = torch.ones(1, 4, 4, 4, dtype=torch.bool)
    valid[0, 0, 0, 0] = False  # read by feature voxel (0,0,0) at stride 2, offset 0
    valid[0, 3, 2, 1] = False  # read by no feature voxel at offset 0 ...
    _, v2 = sample_coords(_grid((4, 4, 4))[None], valid, (2, 2, 2), (0, 0, 0), (2, 2, 2))
    expected = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    expected[0, 0, 0, 0] = False
    assert torch.equal(v2, expected)
    # ... but by feature voxel (1,1,0) when the centres sit between voxels (interpolated from both neighbours)
    _, v2 = sample_coords(_grid((4, 4, 4))[None], valid, (2, 2, 2), (0.5, 0.5, 0.5), (2, 2, 2))
    assert not v2[0, 1, 1, 0] and not v2[0, 0, 0, 0] and v2.sum() == 6


def test_feature_grid_composes_kernels_strides_and_paddings():
    assert feature_grid([(3, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1)]) == ((4.0,), (0.0,))
    assert feature_grid([(2, 2, 0)]) == ((2.0,), (0.5,))  # a 2x2 non-overlapping block: its centre
    assert feature_grid([((3, 3, 3), (1, 2, 2), (1, 1, 1))]) == ((1.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    assert feature_grid([(1, 1, 0), (4, 2, 1), (3, 2, 1)]) == ((4.0,), (0.5,))


def _impulse_centres(convs, shape, out_index):
    """Receptive-field centre (per axis) of one output voxel of a chain of the given conv modules, measured: all
    weights 1, no bias, the gradient of that voxel with respect to the input is symmetric about the centre."""
    x = torch.zeros(1, 1, *shape, requires_grad=True)
    h = x
    for conv in convs:
        layer = type(conv)(1, 1, conv.kernel_size, conv.stride, conv.padding, bias=False)
        torch.nn.init.ones_(layer.weight)
        h = layer(h)
    h[(0, 0, *out_index)].backward()
    g = x.grad[0, 0]
    centres = []
    for d in range(len(shape)):
        dims = [i for i in range(len(shape)) if i != d]
        profile = g.sum(dim=dims) if dims else g
        idx = torch.arange(shape[d], dtype=torch.float64)
        centres.append(float((profile.double() * idx).sum() / profile.double().sum()))
    return h.shape[2:], centres


@pytest.mark.parametrize("strides", [[1, 2, 2], [1, (1, 2, 2), 2]])
def test_encoder_grid_matches_the_real_convolutions_impulse(strides):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_ssl.nnunet.model import encoder_grid
    net = PlainConvUNet(1, 3, [2, 4, 8], torch.nn.Conv3d, 3, strides, 2, 2, [1, 1], norm_op=torch.nn.InstanceNorm3d,
                        nonlin=torch.nn.LeakyReLU)
    shape = (32, 32, 32)
    for stage in (1, 2):
        scale, offset = encoder_grid(net, stage)
        convs = [m for name, m in net.encoder.named_modules() if isinstance(m, torch.nn.Conv3d)
                 and int(name.split(".")[1]) <= stage]
        out_index = tuple(int(32 // s // 2) for s in scale)  # interior: the padding does not cut its field
        out_shape, measured = _impulse_centres(convs, shape, out_index)
        predicted = [s * i + o for s, i, o in zip(scale, out_index, offset)]
        assert measured == pytest.approx(predicted, abs=1e-6)
        # the block-centre convention (S * i + (S - 1) / 2) misplaces every strided axis by (S - 1) / 2
        block = [s * i + (s - 1) / 2 for s, i in zip(scale, out_index)]
        assert any(abs(b - m) >= 0.5 for b, m in zip(block, measured))
        assert tuple(out_shape) == tuple(-(-n // int(s)) for n, s in zip(shape, scale))
    # residual encoders: stem + blocks whose parallel 1x1 skip convs are not part of the chain
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
    res = ResidualEncoderUNet(1, 3, [2, 4, 8], torch.nn.Conv3d, 3, strides, 1, 2, [1, 1],
                              norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    assert any("skip" in n for n, m in res.encoder.named_modules() if isinstance(m, torch.nn.Conv3d))
    assert encoder_grid(res, 2) == encoder_grid(net, 2)


def test_mirrored_views_have_no_exact_partners_at_stride_above_one():
    # view b = view a mirrored along axis 0; at stride S (offset 0) view a's voxel i sits on input S*i, view b's
    # voxels on the mirrored positions s-1-S*j: the index-mirrored partner is S-1 input voxels away
    s = 16
    coords_a = _grid((s, 4, 4))[None]
    coords_b = coords_a.flip(2)
    valid = torch.ones(1, s, 4, 4, dtype=torch.bool)
    for stride in (2, 4):
        ca, _ = sample_coords(coords_a, valid, (stride, 1, 1), (0, 0, 0), (s // stride, 4, 4))
        cb, _ = sample_coords(coords_b, valid, (stride, 1, 1), (0, 0, 0), (s // stride, 4, 4))
        pa, pb = ca[0, 0, :, 0, 0], cb[0, 0, :, 0, 0]
        assert torch.equal((pa - pb.flip(0)).abs(), torch.full_like(pa, stride - 1.0))  # index-mirrored partner
        nearest = (pa[:, None] - pb[None, :]).abs().min(dim=1).values
        assert (nearest >= 1).all()  # and no feature voxel of view b matches exactly


def test_invalid_b_voxels_never_matched_even_at_origin():
    # Invalid b voxels must not be matched, even where their stored coordinate coincides
    # exactly with an a voxel (here: b shows the same grid, with the origin region invalid).
    shape = (3, 3, 3)
    ca = _grid(shape)[None]
    cb = ca.clone()
    va = torch.ones(1, *shape, dtype=torch.bool)
    vb = torch.ones(1, *shape, dtype=torch.bool)
    vb[0, 0] = False  # the x = 0 slab of view b
    out = sample_correspondences(ca, va, cb, vb, 27, tolerance=1.01, candidate_factor=None)
    m = out["mask"][0]
    assert int(m.sum()) == 27  # every a voxel has a valid b voxel within one voxel
    ia, ib = out["index_a"][0][m], out["index_b"][0][m]
    assert vb.reshape(-1)[ib].all()
    # x = 0 voxels map to their x = 1 neighbour, others to themselves.
    expected = torch.where(ia // 9 == 0, ia + 9, ia)
    assert torch.equal(ib, expected)
    torch.testing.assert_close(out["distance"][0][m], (ia // 9 == 0).float())


def test_small_overlap_still_filled_with_few_candidates():
    # Views overlap in 2 of 20 slabs; restricting candidates to view b's extent keeps
    # the hit rate high even with candidate_factor=1.
    shape = (20, 10, 10)
    ca = _grid(shape)[None]
    cb = ca.clone()
    cb[:, 0] += 18.0
    v = torch.ones(1, *shape, dtype=torch.bool)
    out = sample_correspondences(ca, v, cb, v.clone(), 32, tolerance=0.5, candidate_factor=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert out["mask"].all()
    ia, ib = out["index_a"][0], out["index_b"][0]
    assert (ia // 100 >= 18).all()
    assert torch.equal(ib, ia - 1800)


@pytest.mark.parametrize("n", [5, 128, 129, 200, 2304])
def test_argmin_last_equals_argmin_first_occurrence(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 7, (3, 11, n), generator=g).float()  # many ties: the first occurrence must win
    x[0, 0] = float("inf")  # a row without any finite value
    x[1, 2, -1] = -5.0  # the minimum in the last (padded) block
    torch.testing.assert_close(argmin_last(x), x.argmin(dim=-1), rtol=0, atol=0)
    y = torch.randn(4, n, generator=g)
    assert torch.equal(argmin_last(y), y.argmin(dim=-1))


def _affine_view(shape, spacing, g, elastic=0.0):
    """Coordinates of a view of a volume: a random rotation, per-axis scale and mirroring of the voxel lattice
    (spacing in volume voxels, as a strided feature map), shifted to the volume's middle, plus an optional smooth
    displacement of up to ``elastic`` voxels."""
    nd = len(shape)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    scale = torch.tensor(spacing, dtype=torch.float64) * (0.7 + 0.7 * torch.rand(nd, generator=g, dtype=torch.float64))
    sign = torch.where(torch.rand(nd, generator=g) < 0.5, -1.0, 1.0).double()
    a = q[:, :nd] * (scale * sign)  # (3, nd)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).view(nd, *([1] * nd))
    shift = 60.0 + 3 * torch.rand(3, generator=g, dtype=torch.float64)
    c = torch.einsum("cd,d...->c...", a, idx - centre) + shift.view(3, *([1] * nd))
    if elastic:
        phase = torch.rand(3, generator=g) * 6.28
        c = c + elastic * torch.stack([torch.sin(idx[i % nd] * 0.4 + phase[i]) for i in range(3)])
    return c.float()


@pytest.mark.parametrize("shape,spacing,elastic", [((12, 16, 12), (2, 2, 2), 0.0), ((4, 12, 10), (1, 2, 2), 0.0),
                                                   ((12, 16, 12), (2, 2, 2), 0.4), ((20, 24), (2, 2), 0.0)])
def test_window_search_equals_brute_force(shape, spacing, elastic):
    from nnunet_ssl.core.correspondence import _window_nearest
    g = torch.Generator().manual_seed(sum(shape))
    bsz = 4
    ca = torch.stack([_affine_view(shape, spacing, g, elastic) for _ in range(bsz)])
    cb = torch.stack([_affine_view(shape, spacing, g, elastic) for _ in range(bsz)])
    va = torch.rand(bsz, *shape, generator=g) < 0.9
    vb = torch.rand(bsz, *shape, generator=g) < 0.9
    vb[0, : shape[0] // 2] = False  # part of a view outside the volume
    tol = 1.0 * max(spacing)
    # the window is really taken (an affine fit, a box much smaller than the view), not the brute-force fallback
    p = cb.flatten(2).transpose(1, 2)
    assert _window_nearest(p[:, :5], torch.where(vb.flatten(1)[..., None], p, 0), vb.flatten(1), shape, tol) is not None
    outs = {s: sample_correspondences(ca, va, cb, vb, 64, tol, generator=torch.Generator().manual_seed(3), search=s)
            for s in ("window", "brute", "native", "auto")}
    w, b = outs["window"], outs["brute"]
    assert w["mask"].sum() > bsz * 32  # the views overlap: most slots matched
    assert torch.equal(w["mask"], b["mask"]) and torch.equal(w["index_a"], b["index_a"])
    torch.testing.assert_close(w["distance"], b["distance"], rtol=0, atol=1e-5)
    # the same voxel, or one exactly as near (a tie)
    assert (w["index_b"] == b["index_b"]).float().mean() > 0.99
    # the default on CPU is the C matching (the window without a C compiler): the window's pairs; a square root in
    # C may differ from torch's by an ulp
    for c in (outs["native"], outs["auto"]):
        assert all(torch.equal(c[k], w[k]) for k in ("mask", "index_a", "index_b"))
        torch.testing.assert_close(c["distance"], w["distance"], rtol=2e-7, atol=0)


def test_window_search_falls_back_where_no_affine_fit_helps():
    from nnunet_ssl.core.correspondence import _window_nearest
    g = torch.Generator().manual_seed(0)
    shape = (8, 8, 8)
    pts = torch.rand(2, 512, 3, generator=g) * 8
    v = torch.ones(2, 512, dtype=torch.bool)
    assert _window_nearest(pts[:, :10], pts, v, shape, 1.0) is None  # scattered: the box would be the whole view
    grid = _grid(shape).flatten(1).t()[None].expand(2, -1, -1).contiguous()
    flat = v.clone()
    flat[:, 64:] = False  # valid voxels on one plane: no 3-D fit
    assert _window_nearest(grid[:, :10], grid, flat, shape, 1.0) is None
    assert _window_nearest(grid[:, :10], grid, v, shape, 1.0) is not None
    none = v.clone()
    none[1] = False  # a view without any valid voxel: a dummy fit, never a match, the window kept for the others
    nn_idx, d2 = _window_nearest(grid[:, :10], grid, none, shape, 1.0)
    assert (d2[0] == 0).all() and torch.isinf(d2[1]).all() and torch.equal(nn_idx[0], torch.arange(10))
    collapsed = torch.zeros_like(grid) + 5.0  # every voxel shows one point: an affine fit with A = 0
    assert _window_nearest(collapsed[:, :10], collapsed, v, shape, 1.0) is None
    out = sample_correspondences(collapsed.transpose(1, 2).reshape(2, 3, *shape), v.reshape(2, *shape),
                                 collapsed.transpose(1, 2).reshape(2, 3, *shape), v.reshape(2, *shape), 4, 1.0)
    assert out["mask"].all()  # brute force took over
    with pytest.raises(ValueError, match="search must be"):
        sample_correspondences(grid.transpose(1, 2).reshape(2, 3, *shape), v.reshape(2, *shape),
                               grid.transpose(1, 2).reshape(2, 3, *shape), v.reshape(2, *shape), 4, 1.0, search="x")
