"""Diagnostics that make the methods visible.

``nnunet-ssl inspect-pairs``: one sampled batch of a pretraining trainer, mid-slices of every crop, with the
positives / negatives / excluded crops of one anchor framed in colour.
``nnunet-ssl inspect-embeddings``: for a query voxel of one case, the cosine-similarity map of a pretrained
checkpoint's dense features over another case, with the canonically corresponding point marked: the visible
evidence that pretraining learned anatomical correspondence.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

COLOURS = {"anchor": "#1f77b4", "positive": "#2ca02c", "negative": "#d62728", "excluded": "#9e9e9e"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _isolated_results():
    """Diagnostics never write into the user's nnUNet_results."""
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="nnunet_ssl_inspect_")
    os.environ.setdefault("nnUNet_n_proc_DA", "0")


def _build_trainer(dataset: str, configuration: str, plans: str, trainer: str, fold, device: torch.device):
    from nnunetv2.run.run_training import get_trainer_from_args
    fold = fold if str(fold) == "all" else int(fold)
    tr = get_trainer_from_args(str(dataset), configuration, fold, trainer, plans, False, device)
    if not hasattr(tr, "pair_selection"):
        raise SystemExit(f"{trainer} is not a pretraining trainer of nnunet_ssl")
    tr.initialize()
    return tr


def _mid_slice(volume: torch.Tensor) -> np.ndarray:
    """(C,*S) -> 2D image of channel 0: the middle slice along the first axis for 3D crops."""
    img = volume[0]
    if img.ndim == 3:
        img = img[img.shape[0] // 2]
    return img.float().cpu().numpy()


def inspect_pairs(dataset: str, trainer: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                  fold="all", anchor: int = 0, output: str = "pairs.png", seed: int = 0,
                  device: str = "cpu") -> dict:
    _isolated_results()
    np.random.seed(seed)
    torch.manual_seed(seed)
    tr = _build_trainer(dataset, configuration, plans, trainer, fold, torch.device(device))
    dl_tr, dl_val = tr.get_dataloaders()
    batch = next(dl_tr)
    for gen in (dl_tr, dl_val):
        if hasattr(gen, "_finish"):
            gen._finish()
    pos, neg = (m.cpu() for m in tr.pair_selection(batch))
    n = batch["data"].shape[0]
    if not 0 <= anchor < n:
        raise SystemExit(f"--anchor must be in [0, {n - 1}] (the batch has {n} crops)")
    centres = batch["canonical_center"]
    dist = (centres - centres[anchor]).norm(dim=1)
    views = batch["view_index"]
    n_views = int(views.max()) + 1
    b = n // n_views
    plt = _plt()
    fig, axes = plt.subplots(n_views, b, figsize=(2.6 * b, 3.3 * n_views), squeeze=False)
    roles = []
    for row in range(n):
        v, col = int(views[row]), row % b
        ax = axes[v][col]
        ax.imshow(_mid_slice(batch["data"][row]), cmap="gray")
        role = "anchor" if row == anchor else "positive" if pos[anchor, row] else \
            "negative" if neg[anchor, row] else "excluded"
        roles.append(role)
        for side in ax.spines.values():
            side.set_edgecolor(COLOURS[role])
            side.set_linewidth(5)
        ax.set_xticks([]); ax.set_yticks([])
        ax.set_title(f"{batch['keys'][col]} v{v}\n{role}, d={dist[row]:.2f}", fontsize=8, color=COLOURS[role])
    fig.suptitle(f"{trainer}: crop {anchor} (blue) — positives green, negatives red, excluded grey "
                 f"(d: canonical distance of crop centres)", fontsize=10)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    summary = {r: roles.count(r) for r in COLOURS}
    print(f"wrote {output}: anchor {anchor} of {n} crops; " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return {"output": output, "roles": roles, "distances": dist.tolist()}


# ---------------------------------------------------------------------------------------------- embeddings
def _load_pretrained(checkpoint: str, device: torch.device):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunet_ssl.nnunet.checkpoint import load_checkpoint_file
    from nnunet_ssl.nnunet.engine import load_head_state
    from nnunet_ssl.nnunet.model import ContrastiveModel

    ckpt = load_checkpoint_file(checkpoint, "cpu")
    if "ssl_heads" not in ckpt:
        raise SystemExit(f"{checkpoint} is not a checkpoint of an nnunet_ssl pretraining trainer (no 'ssl_heads')")
    cls = recursive_find_trainer_class_by_name(ckpt["trainer_name"])
    args = dict(ckpt["init_args"])
    plans = dict(args["plans"])
    plans["continue_training"] = False
    tr = cls(plans, args["configuration"], args["fold"], args["dataset_json"], device=device)
    tr.num_input_channels = len(tr.dataset_json["channel_names"])
    tr.network = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, tr.num_input_channels,
                                               tr.label_manager.num_segmentation_heads, False)
    tr.heads = tr.build_heads()
    tr.network.load_state_dict(ckpt["network_weights"])
    try:
        load_head_state(tr.heads, ckpt["ssl_heads"])
    except ValueError as e:
        raise SystemExit(f"{checkpoint}: {e}")
    inputs = dict(tr.head_inputs)
    dense_heads = {k: v for k, v in inputs.items() if v == "decoder"}
    # methods without a dense head (global-only) are inspected on their decoder-stage features
    model = ContrastiveModel(tr.network, tr.heads, inputs if dense_heads else {"_": "decoder"},
                             tr.decoder_stage)
    return tr, model.to(device).eval(), (next(iter(dense_heads)) if dense_heads else None)


def _dense_features(tr, model, head: Optional[str], volume: torch.Tensor) -> torch.Tensor:
    """Unit-norm dense features (C,*S') of one preprocessed volume (C,*S) padded to the network's divisibility."""
    from nnunet_ssl.nnunet.model import padded_input
    x = padded_input(tr.network, volume)
    with torch.no_grad():
        if head is not None:
            f = model(x)[head]
        else:
            skips = model.network.encoder(x)
            dec = model.network.decoder
            lres = skips[-1]
            for s in range(model.decoder_stage + 1):
                lres = dec.stages[s](torch.cat((dec.transpconvs[s](lres), skips[-(s + 2)]), 1))
            f = F.normalize(lres, dim=1)
    return f[0]


def inspect_embeddings(checkpoint: str, dataset: str, cases: Optional[Sequence[str]] = None,
                       query: Optional[Sequence[float]] = None, output: str = "embeddings.png",
                       device: str = "cpu") -> dict:
    """Similarity of the query voxel's feature (case A) to every voxel of case B."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunet_ssl.nnunet.pair_loader import frame_from_properties

    _isolated_results()
    dev = torch.device(device)
    tr, model, head = _load_pretrained(checkpoint, dev)
    folder = Path(str(nnUNet_preprocessed)) / maybe_convert_to_dataset_name(dataset) / \
        tr.configuration_manager.data_identifier
    if not folder.is_dir():
        raise SystemExit(f"{folder} does not exist: preprocess dataset {dataset} with the checkpoint's plans "
                         f"({tr.plans_manager.plans_name}, {tr.configuration_name}) first")
    ds = infer_dataset_class(str(folder))(str(folder))
    ids = sorted(ds.identifiers)
    a_id, b_id = (cases or ids[:2])[:2]
    if a_id not in ids or b_id not in ids:
        raise SystemExit(f"unknown case(s) {a_id!r}/{b_id!r}; available e.g. {ids[:5]}")
    tf = tr.plans_manager.transpose_forward
    vols, frames = [], []
    for cid in (a_id, b_id):
        data, _, _, props = ds.load_case(cid)
        data = torch.from_numpy(np.asarray(data))
        frames.append(frame_from_properties(props, data.shape[1:], tf))
        if len(tr.configuration_manager.patch_size) == 2:
            data = data[:, data.shape[1] // 2]  # 2d configuration: the middle slice
        vols.append(data)
    fa, fb = (_dense_features(tr, model, head, v) for v in vols)
    # feature voxel i sits on input position scale * i + offset (receptive-field centre of the real convolutions)
    scale, offset = (np.asarray(v, dtype=float) for v in tr.decoder_grid())
    q = np.asarray(query if query is not None else np.asarray(vols[0].shape[1:]) // 2, dtype=float)
    qf = tuple(int(min(max(round((c - o) / s), 0), n - 1)) for c, s, o, n in zip(q, scale, offset, fa.shape[1:]))
    sim = torch.einsum("c,c...->...", fa[(slice(None),) + qf], fb)  # cosine (features are unit-norm)
    # the canonically corresponding point of the query in case B (3D: exact up to the frames' affine maps)
    dim = len(q)
    q3 = np.concatenate([[0.0] * (3 - dim), q]) if dim < 3 else q
    u = frames[0].to_canonical(q3)
    b_index = (u - frames[1].canonical_offset) / frames[1].canonical_scale
    bf = tuple(int(min(max(round((c - o) / s), 0), n - 1)) for c, s, o, n in
               zip(b_index[-dim:], scale, offset, fb.shape[1:]))
    best = np.unravel_index(int(sim.argmax()), tuple(sim.shape))
    best_input = np.asarray(best) * scale + offset
    best3 = np.concatenate([[0.0] * (3 - dim), best_input]) if dim < 3 else best_input
    err = float(np.linalg.norm(frames[1].to_canonical(best3) - u))
    rank = float((sim > sim[bf]).float().mean())
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(12, 4.2))
    img_a = _slice_at(vols[0], int(round(q[0])) if dim == 3 else None)
    img_b = _slice_at(vols[1], int(round(b_index[-3]))) if dim == 3 else _slice_at(vols[1], None)
    ax[0].imshow(img_a, cmap="gray"); ax[0].plot(q[-1], q[-2], "c+", ms=14, mew=3)
    ax[0].set_title(f"{a_id}: query voxel {tuple(int(round(c)) for c in q)}")
    ax[1].imshow(img_b, cmap="gray"); ax[1].plot(b_index[-1], b_index[-2], "yo", ms=10, mfc="none", mew=2)
    ax[1].set_title(f"{b_id}: canonically corresponding point (o)")
    sim_slice = sim[bf[0]] if dim == 3 else sim
    hm = F.interpolate(sim_slice[None, None].float(), size=img_b.shape, mode="bilinear", align_corners=False)[0, 0]
    im = ax[2].imshow(hm.numpy(), cmap="magma", vmin=-1, vmax=1)
    ax[2].plot(b_index[-1], b_index[-2], "yo", ms=10, mfc="none", mew=2)
    ax[2].set_title(f"cosine similarity to the query\n(top-1 match {err:.3f} canonical units from o)")
    fig.colorbar(im, ax=ax[2], fraction=0.046)
    for a in ax:
        a.set_xticks([]); a.set_yticks([])
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    print(f"wrote {output}: best match {err:.3f} canonical units from the corresponding point; "
          f"{rank:.1%} of case B's voxels are more similar than the corresponding one")
    return {"output": output, "match_error": err, "rank_fraction": rank, "cases": (a_id, b_id)}


def _slice_at(volume: torch.Tensor, z: Optional[int]) -> np.ndarray:
    img = volume[0]
    if img.ndim == 3:
        img = img[min(max(z if z is not None else img.shape[0] // 2, 0), img.shape[0] - 1)]
    return img.float().numpy()
