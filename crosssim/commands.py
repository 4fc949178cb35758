"""Core sub-commands: synth, train, evaluate, check. Heavy modules are imported inside each handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from crosssim.adapt_options import ADAPT_METHODS
from crosssim.cli import config_from_args, parse_set


def _synth(args: argparse.Namespace) -> int:
    from crosssim.data.synth import generate_hospitals

    summary = generate_hospitals(args.out, preset=args.preset, seed=args.seed,
                                 images_per_site=args.images_per_site, image_size=args.image_size, progress=print)
    print(f"wrote {len(summary.source_sites)} source sites and target {summary.target_site} "
          f"(ground truth: {summary.target_labels})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from crosssim.centralized import train_pooled

    cfg = config_from_args(args)
    train_pooled(args.sites, cfg, args.out, cache_dir=args.cache)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from crosssim.evaluate import evaluate_adaptations

    adapts = list(dict.fromkeys(args.adapt))  # repeated names once, in the order given
    out = Path(args.out)
    out_dirs = {adapt: out if len(adapts) == 1 else out / adapt for adapt in adapts}
    evaluate_adaptations(args.checkpoint, args.data, out_dirs, labels_csv=args.labels, cache_dir=args.cache,
                         device_name=args.device, adapt_overrides=parse_set(args.set), shots_csv=args.shots,
                         save_adapted=args.save_adapted)
    return 0


def _certs(args: argparse.Namespace) -> int:
    from crosssim.certs import TlsFiles, write_certificates, write_site_keys

    files = TlsFiles(Path(args.folder))
    if args.host:
        write_certificates(args.folder, args.host)
        print(f"wrote {files.ca} (to every hospital: crosssim client --root-certificates {files.ca}), "
              f"{files.server_cert} and {files.server_key} (crosssim server --tls-dir {files.folder}); "
              f"keep {files.folder}/ca.key offline")
    elif not files.ca.is_file():
        raise ValueError(f"{files.folder}: no ca.pem yet; pass --host NAME (the names hospitals connect to)")
    if args.sites:
        for key in write_site_keys(args.folder, args.sites.split(",")):
            print(f"wrote {key} (to that hospital only: crosssim client --auth-key {key})")
        print(f"public keys in {files.auth_keys} (crosssim server --tls-dir {files.folder} --auth-keys "
              f"{files.auth_keys})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from crosssim.data.check import run_check

    cfg = config_from_args(args)
    return run_check(args.folder, args.labels, cfg.data, args.json)


def add_commands(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    synth = subparsers.add_parser(
        "synth", help="write synthetic hospitals as DICOM folders (3 labeled sources + 1 unlabeled target)",
        description="Write synthetic chest-radiograph-like hospitals as real DICOM files. Each site follows a "
                    "scanner profile from configs/synth/<preset>.toml. The target folder has no labels.csv; its "
                    "ground truth goes to OUT/target_labels.csv.")
    synth.add_argument("out", help="output folder (created; an earlier synth output there is replaced)")
    synth.add_argument("--preset", default="default", help="default | hard | path to a preset TOML")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed → identical files")
    synth.add_argument("--images-per-site", type=int, help="images per site (default: from the preset)")
    synth.add_argument("--image-size", type=int, help="longer side of every site's matrix, in pixels")
    synth.set_defaults(handler=_synth)

    train = subparsers.add_parser(
        "train", parents=[common], help="pooled training over labeled sites (centralized bound / local-only)",
        description="Train one model on the union of the given labeled sites (each a DICOM folder with "
                    "labels.csv). With one site this is the local-only baseline. Writes RUN/final.pt, "
                    "RUN/config.toml and data/training reports.")
    train.add_argument("--sites", nargs="+", required=True, metavar="DIR", help="labeled site folders")
    train.add_argument("--out", required=True, metavar="RUN", help="run folder for checkpoint and reports")
    train.add_argument("--cache", metavar="DIR", help="hospital-side tensor cache (default: config cache-dir)")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser(
        "evaluate", help="predict an (unlabeled) site; label-free estimates, shift alarms, real metrics with --labels",
        description="Predict every DICOM image of a site with a checkpoint. Writes OUT/predictions.csv, "
                    "OUT/metrics.json and OUT/report.html. Always: predicted vs source prevalence, confidence, "
                    "entropy, the deployed model's estimated accuracy with a bootstrap interval (ATC; after "
                    "tent, crosssim or --shots: ATC of the AdaBN model), DoC estimate and two shift alarms "
                    "(embedding distance to the global prototypes, BatchNorm statistics drift). With --labels: "
                    "accuracy, balanced accuracy, macro AUC, per-class sensitivity/specificity, confusion matrix, "
                    "ECE and the error of the label-free estimates. The checkpoint file is never modified.")
    evaluate.add_argument("--checkpoint", required=True, metavar="FILE", help="a .pt from train or a federated run")
    evaluate.add_argument("--data", required=True, metavar="DIR", help="site folder of DICOM files")
    evaluate.add_argument("--labels", metavar="CSV", help="ground truth 'path,label' for scoring (optional)")
    evaluate.add_argument("--out", required=True, metavar="DIR", help="folder for predictions, metrics and report")
    evaluate.add_argument("--cache", metavar="DIR", help="hospital-side tensor cache")
    evaluate.add_argument("--device", help="auto | cpu | cuda (default: the checkpoint config's device)")
    evaluate.add_argument("--adapt", choices=ADAPT_METHODS, nargs="+", default=["none"], metavar="METHOD",
                          help="label-free adaptation of a copy of the model to the site's images: none; adabn "
                               "(re-estimate BatchNorm statistics); tent (entropy minimization on BatchNorm affine "
                               "parameters, then adabn); crosssim (adabn, then SHOT-style training of the feature "
                               "layers toward the sources' class prevalence and the global prototypes, head "
                               "frozen); auto (crosssim, else tent, else adabn, whichever first passes the "
                               "degeneracy checks of crosssim/adapt_choice.py; none below 32 images). metrics.json "
                               "and the report say which was used and why. Several methods (e.g. --adapt none "
                               "adabn auto) compare them in one run: OUT/METHOD/ each, the model and the site "
                               "loaded once and each adaptation made once (auto reuses the others). Default: none")
    evaluate.add_argument("--shots", metavar="CSV",
                          help="few-shot adaptation: 'path,label' rows of 1-20 labeled target images per class; "
                               "the few-shot model is the one written unless cross-validation on the shots "
                               "(2+ per class) finds it worse than the label-free --adapt model; both are reported "
                               "side by side, and shot images are never scored")
    evaluate.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                          help="override an [adapt] key of the checkpoint's config, e.g. --set shot-epochs=5 "
                               "--set tent-steps=20 (repeatable; see configs/default.toml)")
    evaluate.add_argument("--save-adapted", metavar="FILE",
                          help="write the deployed (adapted or few-shot) model as a checkpoint; never the input")
    evaluate.set_defaults(handler=_evaluate)

    certs = subparsers.add_parser(
        "certs", help="write a private CA, a SuperLink certificate and hospital keys (no openssl needed)",
        description="With --host: write FOLDER/ca.pem, ca.key, server.pem and server.key (ECDSA P-256); the "
                    "server certificate's subject alternative names are the given hosts (DNS names or IP "
                    "addresses): every name hospitals use to reach the server. With --sites: one ECDSA P-384 "
                    "key pair per hospital for SuperNode authentication, FOLDER/sites/NAME.key (give it to that "
                    "hospital only) and FOLDER/auth-keys/NAME.pub (the server registers them); --sites alone adds "
                    "hospitals to an existing folder. Never overwrites existing files.")
    certs.add_argument("folder", help="output folder (created; must not hold the files it writes already)")
    certs.add_argument("--host", nargs="+", metavar="NAME",
                       help="names and IPs hospitals connect to, e.g. --host fl.example.org 10.0.0.5 127.0.0.1 "
                            "(required the first time: it creates the CA)")
    certs.add_argument("--sites", metavar="A,B,...", help="hospital names to write an authentication key pair for")
    certs.set_defaults(handler=_certs)

    check = subparsers.add_parser(
        "check", parents=[common], help="scan a site folder before joining: usable images, skips, labels, privacy",
        description="Scan a hospital's DICOM folder the way training would read it: counts by modality, "
                    "photometric interpretation, transfer syntax and size; skipped files with reasons; label "
                    "coverage; identifying tags. Exits 1 when nothing is usable, 2 when the folder is missing.")
    check.add_argument("folder", help="site folder")
    check.add_argument("--labels", metavar="CSV", help="labels file (default: FOLDER/labels.csv when present)")
    check.add_argument("--json", action="store_true", help="print machine-readable JSON")
    check.set_defaults(handler=_check)
