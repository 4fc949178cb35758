"""Every name that crosses a process boundary, in one place (flwr-free).

A Flower message between the server and a hospital, the node config a SuperNode hands its ClientApp
processes, the run config `flwr run` hands the ServerApp, and the run folder that the server writes and
benchmarks, tests and `crosssim evaluate` read: each of their names is defined here once. Changing one
is a protocol change; ``tests/test_privacy.py`` checks what the records may hold.
"""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------- records of a message (RecordDict keys)
ARRAYS_RECORD = "arrays"  # model tensors (ArrayRecord); the one record Flower's FedAvg averages
CONFIG_RECORD = "config"  # flat kebab-case config + the per-round instructions below (ConfigRecord)
METRICS_RECORD = "metrics"  # scalar metrics and fixed-length summaries (MetricRecord)
PROTOTYPES_RECORD = "prototypes"  # per-class embedding means with counts (ArrayRecord)
PROTOTYPE_VECTORS = "vectors"  # inside PROTOTYPES_RECORD: (C, d) float32
PROTOTYPE_COUNTS = "counts"  # inside PROTOTYPES_RECORD: (C,) int64, 0 = class not sent
STYLE_RECORD = "style"  # a site's style entry (crosssim.style.StyleEntry.to_arrays), site → server
STYLE_BANK_RECORD = "style-bank"  # every site's entry, keyed "<node id>/<layer>/<stat>", server → sites
EVALUATION_RECORD = "evaluation"  # round-style one-message: a train reply's evaluate metrics of the incoming model
TIMINGS_RECORD = "timings"  # wall-clock instants (s since the epoch) of a site's message, the TIMING_EVENTS below

# ---------------------------------------------------------------- per-node state (Context.state keys)
BATCHNORM_STATE_RECORD = "batchnorm"  # a site's own BatchNorm layers under FedBN; never sent

# ---------------------------------------------------------------- per-round instructions in CONFIG_RECORD
SERVER_ROUND = "server-round"
ROUND_LR = "round-lr"
ROUND_LAMBDA = "round-lambda"
ROUND_EVALUATE = "round-evaluate"  # train message, round-style one-message: evaluate the incoming model first

# ---------------------------------------------------------------- metric names in METRICS_RECORD
NUM_EXAMPLES = "num-examples"  # weighs Flower's averaging
COMPUTE_SECONDS = "compute-s"  # local training + prototypes (train) or inference (evaluate)
LOAD_SECONDS = "load-s"  # reading the site through the hospital-side cache
CONFIDENCE_HISTOGRAM = "confidence-histogram"  # fixed-length, of the validation split (evaluate)
TRAIN_CLASS_COUNTS = "train-class-counts"  # training split per class, cells under min-count sent as 0 (evaluate)
SITE_CLASS_COUNTS = "site-class-counts"  # whole labeled site per class, cells under min-count sent as 0 (train)
TARGET_IMAGES = "target-images"  # an unlabeled node in the loop: how many images its style entry covers (train)
SHIFT_PREFIX = "shift/"  # + a crosssim.shift figure name: that figure on the site's validation split (evaluate)

# ---------------------------------------------------------------- instants in TIMINGS_RECORD, in the order they happen
PROCESS_STARTED = "process-started"  # the ClientApp process (Flower starts one per message)
IMPORTS_STARTED = "imports-started"  # client/app.py begins importing (Flower's own imports are done)
IMPORTS_DONE = "imports-done"  # client/app.py and everything it imports are loaded
HANDLER_STARTED = "handler-started"  # Flower called the train/evaluate handler with the message
DATA_LOADED = "data-loaded"  # the site read through the hospital-side cache
MODEL_BUILT = "model-built"  # the global model built and loaded
COMPUTE_DONE = "compute-done"  # evaluation and/or training finished
REPLY_PACKED = "reply-packed"  # the reply's records built, handed back to Flower
TIMING_EVENTS = (PROCESS_STARTED, IMPORTS_STARTED, IMPORTS_DONE, HANDLER_STARTED, DATA_LOADED, MODEL_BUILT,
                 COMPUTE_DONE, REPLY_PACKED)

# ---------------------------------------------------------------- run-config keys beyond the config schema's own
CONFIG_FILE_KEY = "config-file"  # TOML layered over configs/default.toml before the run config's own keys
OUT_KEY = "out"  # run folder (RUN below)
RESUME_KEY = "resume"  # continue from RUN/latest.pt
SITE_DIRS_KEY = "site-dirs"  # simulation: comma-separated site folders, partition i = folder i
TARGET_DIR_KEY = "target-dir"  # simulation: an unlabeled target in the loop, the partition after the sites
RUN_KEYS = (CONFIG_FILE_KEY, OUT_KEY, RESUME_KEY, SITE_DIRS_KEY, TARGET_DIR_KEY)
DEFAULT_OUT = "runs/federated"

# ---------------------------------------------------------------- node-config keys
NODE_DATA_KEY = "data"  # deployment: the hospital's site folder (`crosssim client --data`)
NODE_SITE_KEY = "site"  # deployment: its name in logs (`--site`)
NODE_CACHE_KEY = "cache"  # deployment: tensor cache on the hospital's disk (`--cache`)
NODE_UNLABELED_KEY = "unlabeled"  # deployment: true for an unlabeled target in the loop (`--unlabeled`)
PARTITION_ID_KEY = "partition-id"  # simulation: set by Flower, the index into SITE_DIRS_KEY

# ---------------------------------------------------------------- the run folder RUN
RUN_CONFIG_NAME = "config.toml"  # the effective config, written by the ServerApp (server.store.RunStore)
ROUNDS_LOG_NAME = "rounds.jsonl"  # one server.store.RoundRecord per line
LATEST_NAME = "latest.pt"
FINAL_NAME = "final.pt"
ROUND_CHECKPOINT_GLOB = "round-*.pt"
STYLE_BANK_EXTRA = "style_bank"  # Checkpoint.extra key: the server's style bank (crosssim.style.bank_to_arrays)
SUPERLINK_LOG_NAME = "superlink.log"  # `crosssim server` only
FLWR_HOME_DIRNAME = ".flwr"  # `crosssim server` only: FLWR_HOME of its `flwr run`


def round_checkpoint_name(server_round: int) -> str:
    """``round-NNNN.pt`` of a 1-based round."""
    return f"round-{server_round:04d}.pt"


def final_checkpoint(run: str | Path) -> Path:
    return Path(run) / FINAL_NAME
