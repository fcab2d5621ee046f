"""``nnunet-ssl probe``: a representation's quality in minutes, before any fine-tuning.

The checkpoint's U-Net is frozen. Every voxel of a preprocessed case gets a *hypercolumn*: the outputs of every
encoder stage, each brought back to the input's resolution (every input voxel takes the feature voxel whose
receptive field is centred nearest to it), concatenated. A linear (multinomial logistic) classifier is trained on
class-balanced voxels of ``labeled`` cases of a fold's training cases and scored with Dice on the fold's
validation cases. The same probe of a randomly initialised network of the same plans is the reference: a
representation that does not beat random features has learned nothing the labels use.

The encoder is what every pretraining method of the plugin trains (the decoder only partly, depending on the
method), so this compares methods on common ground; it is a ranking signal, not a fine-tuning result.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _network(ckpt: dict, random_init: bool, seed: int):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    args = ckpt["init_args"]
    pm = PlansManager(dict(args["plans"]))
    cm = pm.get_configuration(args["configuration"])
    lm = pm.get_label_manager(args["dataset_json"])
    n_in = len(args["dataset_json"]["channel_names"])
    torch.manual_seed(seed)
    net = nnUNetTrainer.build_network_architecture(pm, cm, n_in, lm.num_segmentation_heads, False)
    if not random_init:
        net.load_state_dict(ckpt["network_weights"])
    return net.eval(), pm, cm, lm


def hypercolumns(network, volume: torch.Tensor) -> torch.Tensor:
    """(C_total, *S) features of one preprocessed volume (C, *S): every encoder stage's output at input resolution."""
    from nnunet_ssl.nnunet.model import encoder_grid, padded_input
    shape = np.asarray(volume.shape[1:])
    with torch.no_grad():
        skips = network.encoder(padded_input(network, volume))
    cols = []
    for i, f in enumerate(skips):
        scale, offset = encoder_grid(network, i)
        # input voxel p takes feature voxel round((p - offset) / scale): the receptive-field centre nearest to it
        f = f[0]
        for d, (sc, off) in enumerate(zip(scale, offset)):
            idx = torch.clamp(torch.round((torch.arange(int(shape[d])) - off) / sc).long(), 0, f.shape[1 + d] - 1)
            f = f.index_select(1 + d, idx)
        cols.append(f)
    return torch.cat(cols, 0)


def _balanced_voxels(features: torch.Tensor, seg: np.ndarray, per_class: int, rng: np.random.Generator):
    flat = features.reshape(features.shape[0], -1)
    labels = seg.reshape(-1)
    xs, ys = [], []
    for c in np.unique(labels):
        if c < 0:
            continue
        where = np.flatnonzero(labels == c)
        pick = rng.choice(where, size=min(per_class, where.size), replace=False)
        xs.append(flat[:, torch.from_numpy(pick)].T)
        ys.append(np.full(pick.size, c))
    return torch.cat(xs), torch.from_numpy(np.concatenate(ys)).long()


def _dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> List[float]:
    out = []
    for c in labels:
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        out.append(float(2 * (p & r).sum() / denom) if denom else float("nan"))
    return out


def _load_cases(dataset: str, configuration_manager, fold: int, labeled: int, seed: int,
                val_cases: Optional[int], score_unlabeled: Optional[int] = None):
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise SystemExit(f"dataset {dataset} is not in nnUNet_raw/nnUNet_preprocessed; plan and preprocess it "
                         f"first") from None
    root = Path(str(nnUNet_preprocessed)) / name
    folder = root / configuration_manager.data_identifier
    if not folder.is_dir():
        raise SystemExit(f"{folder} does not exist: preprocess dataset {dataset} with the checkpoint's plans first")
    splits_file = root / "splits_final.json"
    if not splits_file.exists():
        raise SystemExit(f"{splits_file} does not exist: run one nnUNetv2_train on the dataset (it writes the "
                         f"5-fold split) or write splits_final.json yourself")
    splits = json.loads(splits_file.read_text())
    if not 0 <= fold < len(splits):
        raise SystemExit(f"fold {fold} is not in {splits_file} ({len(splits)} folds)")
    train, val = select_cases(splits[fold]["train"], splits[fold]["val"], labeled, seed, val_cases,
                              score_unlabeled, fold)
    return infer_dataset_class(str(folder))(str(folder)), train, val


def select_cases(fold_train: Sequence[str], fold_val: Sequence[str], labeled: int, seed: int,
                 val_cases: Optional[int] = None, score_unlabeled: Optional[int] = None, fold: int = 0):
    """The probe's k labelled cases (a seeded sample of the fold's training cases) and the cases it scores: the
    fold's validation cases, or with ``score_unlabeled`` N the first N (sorted) training cases the probe is not
    trained on. A pretraining fold has every case in training and only a few in validation; scoring on the unused
    training cases gives the ranking more than those few cases."""
    train, val = sorted(fold_train), sorted(fold_val)
    if labeled > len(train):
        raise SystemExit(f"--labeled {labeled}: fold {fold} has only {len(train)} training cases")
    labelled = random.Random(seed).sample(train, labeled)
    if score_unlabeled is not None:
        rest = [c for c in train if c not in set(labelled)]
        if score_unlabeled > len(rest):
            raise SystemExit(f"--score-unlabeled {score_unlabeled}: fold {fold} has only {len(rest)} training cases "
                             f"besides the {labeled} labelled ones; ask for fewer")
        val = rest[:score_unlabeled]
    if val_cases is not None:
        val = val[:val_cases]
    return labelled, val


def probe(checkpoint: str, dataset: str, fold: int = 0, labeled: int = 5, seed: int = 0,
          voxels_per_class: int = 2000, steps: int = 300, val_cases: Optional[int] = None,
          with_random: bool = True, score_unlabeled: Optional[int] = None) -> Dict:
    """Linear-probe Dice of the checkpoint's frozen encoder (and of a random network of the same plans)."""
    from nnunet_ssl.nnunet.checkpoint import load_checkpoint_file
    ckpt = load_checkpoint_file(checkpoint, "cpu")
    if "init_args" not in ckpt or "network_weights" not in ckpt:
        raise SystemExit(f"{checkpoint} is not a checkpoint written by nnUNetv2_train (no init_args/network_weights)")
    _, pm, cm, lm = _network(ckpt, True, seed)
    if len(cm.patch_size) != 3:
        raise SystemExit("probe supports 3D configurations (the checkpoint's is 2D)")
    ds, train, val = _load_cases(dataset, cm, fold, labeled, seed, val_cases, score_unlabeled)
    cases = {c: ds.load_case(c)[:2] for c in train + val}
    labels = [int(c) for c in lm.foreground_labels]
    out = {"checkpoint": str(checkpoint), "dataset": str(dataset), "fold": fold, "labeled": labeled, "seed": seed,
           "train_cases": train, "val_cases": val}
    for which in (["pretrained", "random"] if with_random else ["pretrained"]):
        net = _network(ckpt, which == "random", seed)[0]
        feats = {c: hypercolumns(net, torch.from_numpy(np.asarray(d))) for c, (d, _) in cases.items()}
        rng = np.random.default_rng(seed)
        xs, ys = zip(*[_balanced_voxels(feats[c], np.asarray(cases[c][1])[0], voxels_per_class, rng) for c in train])
        x, y = torch.cat(xs).float(), torch.cat(ys)
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        torch.manual_seed(seed)
        clf = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        opt = torch.optim.Adam(clf.parameters(), lr=1e-2, weight_decay=1e-4)
        xn = (x - mean) / std
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(clf(xn), y).backward()
            opt.step()
        per_case = {}
        with torch.no_grad():
            for c in val:
                f = feats[c]
                logits = clf(((f.reshape(f.shape[0], -1).T) - mean) / std)
                pred = logits.argmax(1).reshape(f.shape[1:]).numpy()
                per_case[c] = _dice(pred, np.asarray(cases[c][1])[0], labels)
        dice = np.nanmean([np.nanmean(v) for v in per_case.values()])
        out[which] = {"mean_dice": float(dice), "per_class": {str(lb): float(np.nanmean([v[i] for v in
                                                                                          per_case.values()]))
                                                              for i, lb in enumerate(labels)},
                      "per_case": per_case, "features": int(x.shape[1])}
    return out
