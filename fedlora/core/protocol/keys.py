"""Names shared by the ServerApp and the ClientApp: record keys and message config keys (kebab-case)."""

ARRAYS = "arrays"
"""RecordDict key of the ArrayRecord holding the adapter arrays that travel."""
BASE_OFFSETS = "base-offsets"
"""RecordDict key of the ArrayRecord of full-rank offsets to the frozen base weights (FedEx-LoRA, FLoRA)."""
BASE_STACKS = "base-stacks"
"""RecordDict key of the ArrayRecord of stacked low-rank factors that update the base offsets (FLoRA's
downlink, :mod:`fedlora.core.model.offsets`)."""
OFFSETS_VERSION = "offsets-version"
"""Message config key (FLoRA, stacked downlink): the version of the offsets the client must hold after
this message; with stacks, ``offsets-since`` is the version they apply on top of."""
OFFSETS_SINCE = "offsets-since"
OFFSETS_STATE = "fedlora-base-offsets"
"""Node state key of the base offsets (and their version) a FLoRA client keeps between rounds."""
CONFIG = "config"
"""RecordDict key of the ConfigRecord sent with every message."""
PLAN = "plan"
"""RecordDict key of the ConfigRecord with this client's plan for the round
(:mod:`fedlora.core.protocol.plan`)."""
METRICS = "metrics"
"""RecordDict key of the MetricRecord in every reply."""

SERVER_ROUND = "server-round"
ASSIGNED_PARTITION = "assigned-partition"
"""Message config key (simulation only): the partition this message's virtual node plays this time.
Virtual nodes share one data source and keep their state in the run directory by partition, so any of
them can play any partition, and the server need not ask every node which one it holds."""
STATE_DIR = "state-dir"
"""Where clients keep their state between rounds: a node config key (deployment) or a message config
key (the simulation's directory under the run directory); absent = the node's Context.state."""
EXPERIMENT = "experiment"
"""The fully resolved experiment as TOML text: clients parse it with the same code as the server."""

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
PARTITION_ID = "partition-id"
LABEL_COUNTS = "label-counts"
"""The examples of each label (in ``data.labels`` order) in the split a client trained (train replies)
or evaluated on (evaluate replies). Sent only without differential privacy: a label histogram is data
about the client that no mechanism here protects."""
LOCAL_ADAPTER = "fedlora-local-adapter"
"""Node state key of the adapter tensors a client keeps between rounds (FedSA-LoRA's B)."""

RESIDUAL = "fedlora-compression-residual"
"""Node state key of what the uplink codec lost of a client's updates (``compression.error_feedback``)."""

DP_HISTORY = "fedlora-dp-history"
"""Node state key of a DP-SGD client's accountant history (all rounds it trained in)."""

# Privacy, in train replies.
EPSILON = "epsilon"
"""DP-SGD: this client's epsilon after this round, over every round it took part in."""
NOISE_MULTIPLIER = "noise-multiplier"
SECAGG_CLIPPED = "secagg-clipped"
"""Secure aggregation: coordinates of this client's weighted update clipped to the quantiser's range."""
DECLINED = "declined"
"""1 when the client refused to train because the round would exceed its privacy budget."""
STALENESS = "staleness"
"""Server steps between the model a FedBuff update was computed on and the one it is applied to (set by the
server on the reply it aggregates, so ``clients.jsonl`` records it per update)."""
TAIL_NORM_BEFORE = "tail-norm-before"
TAIL_NORM_AFTER = "tail-norm-after"
"""Rank self-pruning (HetLoRA): ||B[:, g:]||_F * ||A[g:, :]||_F summed over layers before and after local
training, g = the plan's ``prune_from``."""
STATUS = "status"
"""RecordDict key of a ConfigRecord with a ``reason`` when a client declined."""
REASON = "reason"

# Node config keys (set by the simulation engine, or by --node-config on a SuperNode).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_STATE_DIR = "state-dir"
NODE_DATA_PATH = "data-path"
"""A deployed SuperNode's own labelled file (any format ``data.source`` takes): the node trains and
evaluates on it and reads no other data; absent = the partition ``partition-id`` of ``data.source``."""
