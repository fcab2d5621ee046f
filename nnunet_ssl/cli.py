"""``nnunet-ssl``: command-line entry point."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from pathlib import Path


def _cmd_env(args) -> int:
    from nnunet_ssl.discovery import ENV_VAR, discovery_folder, extended_value
    # the start-up hook has already extended the variable in this process; print what the user's shell needs
    print(f"export {ENV_VAR}={shlex.quote(extended_value(os.environ.get(ENV_VAR), discovery_folder()))}")
    return 0


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def describe_trainer(cls, registry) -> str:
    """One line: the class's own docstring, else what kind of variant it is, else its module's docstring."""
    own = _first_paragraph(cls.__dict__.get("__doc__"))
    if own:
        return own
    base = next((b for b in cls.__mro__[1:] if b.__name__ in registry), None)
    mixin = next((b for b in cls.__bases__ if b.__name__ not in registry and b.__doc__), None)
    if base is not None:
        return f"{base.__name__} variant" + (f": {_first_paragraph(mixin.__doc__)}" if mixin is not None else "")
    return _first_paragraph(getattr(sys.modules.get(cls.__module__), "__doc__", None))


def _cmd_trainers(args) -> int:
    from nnunet_ssl.trainers import PRETRAINING_TRAINERS, SEGMENTATION_TRAINERS
    registry = {**PRETRAINING_TRAINERS, **SEGMENTATION_TRAINERS}
    width = max(map(len, registry)) + 2
    sections = (("Pretraining trainers (nnUNetv2_train D CONF all -tr NAME; hand-off: fold_all/checkpoint_final.pth)",
                 PRETRAINING_TRAINERS),
                ("Segmentation trainers (nnUNetv2_train D CONF FOLD -tr NAME [-pretrained_weights FILE])",
                 SEGMENTATION_TRAINERS))
    for title, trainers in sections:
        print(title)
        for name, cls in trainers.items():
            budget = (f"{cls.num_epochs} x {cls.num_iterations_per_epoch}"
                      if isinstance(getattr(cls, "num_epochs", None), int) else "")
            print(f"  {name:<{width}}{budget:<12}{describe_trainer(cls, registry)}")
    if args.all:
        from nnunet_ssl.nnunet import trainer_names
        for title, names in (("nnU-Net's trainers", trainer_names.nnunet_trainer_names()),
                             ("Your trainers (nnUNet_extTrainer)", trainer_names.external_trainer_names())):
            print(f"{title} ({len(names)}):")
            print("\n".join(f"  {n}" for n in names) if names else "  none")
    return 0


def _cmd_plan(args) -> int:
    _require_env("nnUNet_raw", "nnUNet_preprocessed")
    from nnunet_ssl.nnunet.planning import plan_and_preprocess
    ident = plan_and_preprocess(args.d, args.pl, args.c, args.np, plans_name=args.overwrite_plans_name,
                                gpu_memory_target_in_gb=args.gpu_memory_target,
                                verify_dataset_integrity=args.verify_dataset_integrity, verbose=True)
    print(f"plans identifier: {ident}  (use: nnUNetv2_train {args.d} {args.c[0] if args.c else 'CONF'} FOLD "
          f"-p {ident} ...)")
    return 0


def _cmd_add_unlabeled(args) -> int:
    _require_env("nnUNet_preprocessed")
    from nnunet_ssl.nnunet.unlabeled import UnlabeledCasesError, add_unlabeled
    try:
        add_unlabeled(args.d, args.i, args.c, args.p, args.np, overwrite=args.overwrite)
    except UnlabeledCasesError as e:
        raise SystemExit(f"nnunet-ssl add-unlabeled: {e}") from None
    print(f"pretraining trainers (nnUNetv2_train {args.d} {args.c[0]} FOLD -tr SpadePretrainTrainer -p {args.p}) now "
          f"train on these cases too; fine-tuning and nnU-Net's own training never see them")
    return 0


def _cmd_demo(args) -> int:
    from nnunet_ssl.demo import QUICK, run_demo
    kwargs = dict(QUICK) if args.quick else {}
    if args.labeled is not None:
        kwargs["labeled"] = args.labeled
    run_demo(work_dir=args.work_dir, dataset=args.dataset, device=args.device, seed=args.seed,
             configuration=args.c, **kwargs)
    return 0


def _cmd_bench_speed(args) -> int:
    _require_env("nnUNet_raw", "nnUNet_preprocessed")
    from nnunet_ssl.step_cost import main_bench
    return main_bench(args)


def _cmd_benchmark(args) -> int:
    from nnunet_ssl.benchmark import main_benchmark
    return main_benchmark(args)


def _cmd_inspect_pairs(args) -> int:
    _require_env("nnUNet_raw", "nnUNet_preprocessed")
    from nnunet_ssl.inspection import inspect_pairs
    inspect_pairs(str(args.d), args.tr, args.c, args.p, args.f, args.anchor, args.o, args.seed, args.device)
    return 0


def _cmd_inspect_embeddings(args) -> int:
    _require_env("nnUNet_preprocessed")
    from nnunet_ssl.inspection import inspect_embeddings
    inspect_embeddings(args.checkpoint, str(args.d), args.cases, args.query, args.o, args.device)
    return 0


def _cmd_probe(args) -> int:
    _require_env("nnUNet_preprocessed")
    from nnunet_ssl.probe import probe
    r = probe(args.checkpoint, str(args.d), args.f, args.labeled, args.seed, args.voxels_per_class, args.steps,
              args.val_cases, not args.no_random, args.score_unlabeled)
    for which in ("pretrained", "random"):
        if which in r:
            per_class = ", ".join(f"{k}: {v:.3f}" for k, v in r[which]["per_class"].items())
            print(f"{which:>10}: linear-probe Dice {r[which]['mean_dice']:.4f} ({per_class}) on {len(r['val_cases'])} "
                  f"{'unlabelled training' if args.score_unlabeled is not None else 'validation'} cases, trained on {args.labeled} cases, {r[which]['features']} features")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


def _cmd_check_weights(args) -> int:
    _require_env("nnUNet_preprocessed")
    from nnunet_ssl.nnunet.weights import check_weights, explain
    report = check_weights(args.checkpoint, str(args.d), args.c, args.p, args.tr)
    print("\n".join(explain(report)))
    return 0 if report["ok"] else 1


def _require_env(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not set: export them as for nnU-Net "
                         f"(see nnU-Net's documentation/setting_up_paths.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet-ssl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("env", help="print the export line that makes nnU-Net find the plugin's trainers")
    s.set_defaults(func=_cmd_env)

    s = sub.add_parser("trainers", help="list the plugin's trainers with their budget (epochs x iterations) and "
                                        "what they do")
    s.add_argument("--all", action="store_true", help="also list nnU-Net's trainers and those in nnUNet_extTrainer")
    s.set_defaults(func=_cmd_trainers)

    s = sub.add_parser("plan", help="fingerprint, plan and preprocess a dataset with a plugin (or nnU-Net) planner")
    s.add_argument("-d", type=int, required=True, help="dataset id")
    s.add_argument("-pl", default="nnUNetPlannerSmall", help="planner class (default: nnUNetPlannerSmall)")
    s.add_argument("-c", nargs="*", default=["3d_fullres"], help="configurations to preprocess")
    s.add_argument("-np", type=int, default=2, help="processes")
    s.add_argument("-overwrite_plans_name", default=None)
    s.add_argument("-gpu_memory_target", type=float, default=None)
    s.add_argument("--verify_dataset_integrity", action="store_true")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("add-unlabeled", help="preprocess image-only cases with a dataset's plans so that pretraining "
                                             "trainers use them too (fine-tuning never sees them)")
    s.add_argument("-d", required=True, help="dataset id or name (planned)")
    s.add_argument("-i", default=None, help="folder of images named like nnU-Net's (CASE_0000.nii.gz, one file per "
                                            "channel); default: the dataset's imagesTs in nnUNet_raw")
    s.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default 3d_fullres)")
    s.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    s.add_argument("-np", type=int, default=2, help="processes (default 2)")
    s.add_argument("--overwrite", action="store_true",
                   help="preprocess every case again, also replacing cases of the same id added from other files")
    s.set_defaults(func=_cmd_add_unlabeled)

    s = sub.add_parser("demo", help="phantom -> pretrain -> fine-tune (scratch vs pretrained) -> predict -> Dice: one "
                                    "run of the benchmark's pipeline (budget 'demo')")
    s.add_argument("--dataset", type=int, default=None,
                   help="run on this existing nnU-Net raw dataset (from nnUNet_raw) instead of the phantom")
    s.add_argument("--work-dir", default="nnunet_ssl_demo", help="all outputs go here (default: ./nnunet_ssl_demo)")
    s.add_argument("--labeled", type=int, default=None, help="labelled cases for fine-tuning (default 5)")
    s.add_argument("--quick", action="store_true",
                   help="smoke-test scale: tiny network and phantom, the benchmark's quick budget (about two minutes)")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("bench-speed", help="per-step time of pretraining trainers vs a stock nnUNetTrainer step")
    s.add_argument("-d", required=True, help="dataset id or name (planned and preprocessed)")
    s.add_argument("-c", default="3d_fullres")
    s.add_argument("-p", default="nnUNetPlans")
    s.add_argument("-tr", nargs="+", default=["nnUNetTrainer", "SpadePretrainTrainer"],
                   help="trainers; the first is the reference (default: nnUNetTrainer SpadePretrainTrainer)")
    s.add_argument("--iterations", type=int, default=10)
    s.add_argument("--device", default="cpu")
    s.add_argument("--workers", type=int, default=0,
                   help="also time the loaders behind nnU-Net's background augmenter with N worker processes")
    s.add_argument("--cpu-bf16", default="auto", choices=["auto", "on", "off", "compare"],
                   help="CPU fast path of the plugin's trainers: their own setting (auto), forced on/off, or "
                        "compare (each such trainer in float32 and bf16, interleaved)")
    s.add_argument("--cpu-fast", nargs="+", default=None, metavar="VARIANT",
                   help="CPU variants of each plugin trainer, interleaved: 'compare' (all) or some of fp32, fp32-cl "
                        "(channels-last, the float32 default), fp32-cl-inorm (channels-last with torch's "
                        "instance_norm), fp32-cl-gn (with group_norm), fp32-compile (torch.compile), fp32-cl-compile, "
                        "bf16")
    s.add_argument("--isolate", action="store_true",
                   help="with --cpu-fast: each trainer and variant in a process of its own, as in its training run "
                        "(allocator, heap and caches its own; the old float32 path 'fp32' with the C library's "
                        "allocator defaults), rounds alternating")
    s.add_argument("--rounds", type=int, default=2, help="rounds of --isolate (default 2)")
    s.add_argument("--json", default=None, help="also write the report here")
    s.set_defaults(func=_cmd_bench_speed)

    s = sub.add_parser("benchmark", help="label efficiency: pretrain each method on the pool, fine-tune on k labelled "
                                         "cases (several seeds), score held-out test cases with nnU-Net")
    s.add_argument("-d", required=True, help="dataset id or folder name in nnUNet_raw (labelled imagesTr/labelsTr)")
    s.add_argument("--work-dir", default="nnunet_ssl_benchmark",
                   help="all outputs (own nnUNet_raw/_preprocessed/_results, results.*); rerun to resume")
    s.add_argument("--methods", nargs="+", default=None,
                   help="default: scratch scratch_long stock simclr recon spade spade_queue spade_soft spade_recon "
                        "(also: pcl drasclr)")
    s.add_argument("--labeled", nargs="+", type=int, default=None, help="labelled cases k (default 2 5 10)")
    s.add_argument("--seeds", nargs="+", type=int, default=None, help="fine-tuning seeds (default 0 1 2 3 4)")
    s.add_argument("--prepare-only", action="store_true",
                   help="write the split (the pool-only nnUNet_raw for tuning, the linked test cases) and stop")
    s.add_argument("--report-only", action="store_true",
                   help="rewrite results.md/.csv/.png from the finished cells (--cells-dir) and stop: nothing trained")
    s.add_argument("--jobs", type=int, default=1,
                   help="cells trained side by side (each with cores/jobs threads; a stock cell waits for its scratch "
                        "cell); 2 on a 2-core CPU overlaps one cell's data loading with the other's compute")
    s.add_argument("--cells-dir", default=None,
                   help="where finished cells are kept and looked up (default WORK_DIR/cells); a folder in a "
                        "repository lets a fresh machine continue a long benchmark instead of starting over")
    s.add_argument("--budget", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: small network, fixed short schedules; gpu: standard plans and schedules")
    s.add_argument("--quick", action="store_true", help="smoke scale (tiny network, 2-epoch trainers, k=5, one "
                                                        "seed, 10 test cases): checks the protocol in minutes")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="CPU arithmetic of all trainings (auto: bf16 where the CPU supports it)")
    s.add_argument("--test-raw", default=None, help="score on this labelled folder (imagesTs+labelsTs or "
                                                    "imagesTr+labelsTr) instead of a hold-out; all cases form the pool")
    s.add_argument("--test-fraction", type=float, default=0.25)
    s.add_argument("--split-seed", type=int, default=0, help="seed of the pool/test split")
    s.add_argument("--finetune-trainer", default=None,
                   help="fine-tune 'scratch' with this trainer instead of the budget's (investigations; cells are "
                        "named after it, so they sit next to the default cells in the same work dir)")
    s.add_argument("--pretrained-finetune-trainer", default=None,
                   help="fine-tune the pretrained starts with this trainer instead of the budget's recipe")
    s.add_argument("--planner", default=None,
                   help="plan with this planner instead of the budget's (e.g. nnUNetPlannerCPUWide); its plans name "
                        "is part of the cells' names")
    s.add_argument("--pretrain-trainer", nargs="+", default=None, metavar="METHOD=TRAINER",
                   help="pretrain METHOD with TRAINER instead of the budget's (e.g. spade=SpadePretrainTrainer_cpu_t03)")
    s.add_argument("-c", default="3d_fullres")
    s.add_argument("-np", type=int, default=2, help="processes for preprocessing and evaluation")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    s.set_defaults(func=_cmd_benchmark)

    s = sub.add_parser("inspect-pairs", help="draw one sampled batch with one anchor's positives/negatives/excluded")
    s.add_argument("-d", required=True, help="dataset id or name (planned and preprocessed)")
    s.add_argument("-tr", required=True, help="pretraining trainer, e.g. SpadePretrainTrainer")
    s.add_argument("-c", default="3d_fullres")
    s.add_argument("-p", default="nnUNetPlans")
    s.add_argument("-f", default="all", help="fold whose training cases are sampled (default all)")
    s.add_argument("--anchor", type=int, default=0, help="row of the anchor crop in the batch")
    s.add_argument("-o", default="pairs.png", help="output PNG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_inspect_pairs)

    s = sub.add_parser("inspect-embeddings", help="cosine-similarity map of pretrained dense features: query voxel "
                                                  "in one case vs every voxel of another")
    s.add_argument("checkpoint", help="checkpoint_final.pth of a pretraining run")
    s.add_argument("-d", required=True, help="dataset id or name (preprocessed with the checkpoint's plans)")
    s.add_argument("--cases", nargs=2, default=None, metavar=("A", "B"), help="default: the first two cases")
    s.add_argument("--query", nargs="+", type=float, default=None,
                   help="query voxel in case A (preprocessed voxel coordinates; default: the volume centre)")
    s.add_argument("-o", default="embeddings.png", help="output PNG")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_inspect_embeddings)

    s = sub.add_parser("probe", help="linear probe of a checkpoint's frozen encoder: voxel classifier trained on k "
                                     "labelled cases, Dice on a fold's validation cases (and for a random network)")
    s.add_argument("checkpoint", help="checkpoint_final.pth (pretraining or any nnUNetv2_train run)")
    s.add_argument("-d", required=True, help="dataset id or name (preprocessed with the checkpoint's plans)")
    s.add_argument("-f", type=int, default=0, help="fold of splits_final.json: its training cases give the k "
                                                  "labelled cases, its validation cases are scored (default 0)")
    s.add_argument("--labeled", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--voxels-per-class", type=int, default=2000)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--val-cases", type=int, default=None, help="score only the first N validation cases")
    s.add_argument("--score-unlabeled", type=int, default=None, metavar="N",
                   help="score on N of the fold's training cases the probe is not trained on instead of its "
                        "validation cases (a pretraining fold has only a few validation cases)")
    s.add_argument("--no-random", action="store_true", help="skip the random-network reference")
    s.add_argument("--json", default=None, help="also write the full result (per case, per class) here")
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("check-weights", help="say before training whether a checkpoint's weights fit a dataset's "
                                             "configuration (-pretrained_weights), and what differs")
    s.add_argument("checkpoint")
    s.add_argument("-d", required=True, help="target dataset id or name (planned)")
    s.add_argument("-c", default="3d_fullres")
    s.add_argument("-p", default="nnUNetPlans", help="target plans identifier")
    s.add_argument("-tr", default="nnUNetTrainer", help="fine-tuning trainer whose network receives the weights")
    s.set_defaults(func=_cmd_check_weights)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnunet_ssl.nnunet.input_checks import BadInputError
    try:
        return args.func(args)
    except (BadInputError, ValueError, FileNotFoundError, RuntimeError) as error:
        message = bad_input_message(error)
        if message is None or os.environ.get("NNUNET_SSL_TRACEBACK") == "1":
            raise
        # bad input: one line naming the problem and the fix, no traceback
        raise SystemExit(f"nnunet-ssl {args.command}: error: {message}") from None


def bad_input_message(error: BaseException):
    """One line for errors that are caused by the input (unknown dataset, missing or corrupt file, a value out of
    range), None for anything else (a bug keeps its traceback)."""
    from nnunet_ssl.nnunet.input_checks import BadInputError
    text = " ".join(str(error).split())
    if isinstance(error, BadInputError) or isinstance(error, (ValueError, FileNotFoundError)):
        return text
    found = re.search(r"Could not find a dataset with the (?:ID|name) (\S+?)\.", text)
    if found:
        wanted = found.group(1)
        return (f"dataset {wanted} is not known to nnU-Net: no DatasetXXX folder for it in nnUNet_raw "
                f"({os.environ.get('nnUNet_raw', 'unset')}) or nnUNet_preprocessed "
                f"({os.environ.get('nnUNet_preprocessed', 'unset')}); check the id and these variables")
    return None


if __name__ == "__main__":
    sys.exit(main())
