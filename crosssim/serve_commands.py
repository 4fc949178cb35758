"""Serving sub-commands: export (checkpoint → ONNX + manifest) and serve (HTTP API). Heavy imports in handlers."""

from __future__ import annotations

import argparse

from crosssim.adapt_options import ADAPT_METHODS

DEFAULT_SERVE_HOST = "127.0.0.1"  # loopback: reaching the service from elsewhere is an explicit --host choice
DEFAULT_SERVE_PORT = 8080
DEFAULT_MAX_UPLOAD_MB = 50  # a few uncompressed CT/MR frames or one large radiograph
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _export(args: argparse.Namespace) -> int:
    from crosssim.export import export_model

    export_model(args.checkpoint, args.out, adapt=args.adapt, data_dir=args.data, quantize=args.quantize,
                 cache_dir=args.cache, device_name=args.device)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from crosssim.processes import require_free_port
    from crosssim.serve_app import BYTES_PER_MB, create_app, read_token

    token = None if args.token_file is None else read_token(args.token_file)
    if token is None and args.host not in LOOPBACK_HOSTS:
        print(f"crosssim serve: warning: listening on {args.host} without --token-file: anyone who reaches "
              "the port can query the model")
    certfile, keyfile = _tls_files(args)
    require_free_port(args.host, args.port, "--port")
    app = create_app(args.model_dir, int8=args.int8, token=token,
                     max_upload_bytes=int(args.max_upload_mb * BYTES_PER_MB), threads=args.threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", server_header=False,
                ssl_certfile=certfile, ssl_keyfile=keyfile)
    return 0


def _tls_files(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The certificate and key to serve HTTPS with (from --tls-dir or the two --ssl-* files), each checked."""
    from crosssim.certs import chosen_tls_files
    from crosssim.processes import require_pem

    files = chosen_tls_files(args.tls_dir, {"--ssl-certfile": args.ssl_certfile, "--ssl-keyfile": args.ssl_keyfile},
                             lambda tls: (tls.server_cert, tls.server_key))
    if files is None:
        return None, None
    require_pem(files[0], "certificate", "--ssl-certfile")
    require_pem(files[1], "private key", "--ssl-keyfile")
    return files[0], files[1]


def add_commands(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = subparsers.add_parser(
        "export", help="write a checkpoint (optionally adapted, optionally int8) as ONNX + manifest for serve",
        description="Export a checkpoint's model to DIR/model.onnx (logits and embedding, any batch size) and "
                    "DIR/manifest.json (checkpoint sha256, classes, preprocessing, ATC threshold, global "
                    "prototypes, shift-alarm reference, adaptation). --adapt exports a copy adapted to the "
                    "--data site's images; --quantize int8 adds DIR/model-int8.onnx, statically quantized with "
                    "onnxruntime and calibrated on the --data site's images (never its labels). Files are "
                    "written atomically, the manifest last; the checkpoint file is never modified.")
    export.add_argument("--checkpoint", required=True, metavar="CK", help="a .pt from train or a federated run")
    export.add_argument("--out", required=True, metavar="DIR", help="serving folder to write")
    export.add_argument("--adapt", choices=ADAPT_METHODS, default="none",
                        help="label-free adaptation to --data before export, as in `crosssim evaluate --adapt` "
                             "(default: none)")
    export.add_argument("--quantize", choices=("int8",), help="also write an int8 model calibrated on --data")
    export.add_argument("--data", metavar="DIR", help="site folder of DICOM files for --adapt and --quantize")
    export.add_argument("--cache", metavar="DIR", help="hospital-side tensor cache")
    export.add_argument("--device", help="auto | cpu | cuda for adaptation (default: the checkpoint's)")
    export.set_defaults(handler=_export)

    serve = subparsers.add_parser(
        "serve", help="HTTP prediction service for an exported model (ONNX Runtime)",
        description="Serve DIR (written by `crosssim export`) over HTTP. POST /v1/predict: one DICOM file "
                    "(multipart field 'file', or the raw body with Content-Type application/dicom) → class, "
                    "confidence, probabilities, alarms (low_confidence, far_from_prototypes) and the model "
                    "hash; POST /v1/predict/batch: several 'file' fields; GET /v1/model; GET /health. Images "
                    "are preprocessed exactly as in training, in memory: never written to disk, never logged.")
    serve.add_argument("model_dir", metavar="DIR", help="serving folder from `crosssim export`")
    serve.add_argument("--host", default=DEFAULT_SERVE_HOST,
                       help=f"address to listen on (default {DEFAULT_SERVE_HOST}; 0.0.0.0 for other machines)")
    serve.add_argument("--port", type=int, default=DEFAULT_SERVE_PORT, help=f"port (default {DEFAULT_SERVE_PORT})")
    serve.add_argument("--token-file", metavar="F",
                       help="file holding a bearer token: every request but /health then needs "
                            "'Authorization: Bearer <token>'")
    serve.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                       help=f"largest request body in MB; larger uploads get 413 (default {DEFAULT_MAX_UPLOAD_MB})")
    serve.add_argument("--int8", action="store_true", help="serve DIR/model-int8.onnx (export --quantize int8)")
    serve.add_argument("--threads", type=int, default=0,
                       help="ONNX Runtime intra-op threads (default 0: one per physical core)")
    tls = serve.add_argument_group("HTTPS")
    tls.add_argument("--tls-dir", metavar="DIR", help="serve HTTPS with DIR/server.pem and DIR/server.key from "
                     "`crosssim certs DIR --host NAME` (clients trust DIR/ca.pem)")
    tls.add_argument("--ssl-certfile", metavar="FILE", help="your own certificate (with --ssl-keyfile)")
    tls.add_argument("--ssl-keyfile", metavar="FILE", help="its private key")
    serve.set_defaults(handler=_serve)
