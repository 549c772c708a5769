"""Message types and parameter keys of the round protocol: FedML's where they exist, ours beside them.

Only `fedpeft_edge/protocol/` (and the transport, for routing and metering) reads these keys.
"""

from __future__ import annotations

# --- message types ------------------------------------------------------------------------------------
# FedML's ids (fedml/cross_silo/{client,server}/message_define.py, MyMessage), same values.
MSG_TYPE_CONNECTION_IS_READY = 0  # FedML's; ours is a local event (events.ConnectionReady), never a frame
MSG_TYPE_S2C_INIT_CONFIG = 1
MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT = 2
MSG_TYPE_C2S_SEND_MODEL_TO_SERVER = 3
MSG_TYPE_C2S_SEND_STATS_TO_SERVER = 4
MSG_TYPE_C2S_CLIENT_STATUS = 5
MSG_TYPE_S2C_CHECK_CLIENT_STATUS = 6
MSG_TYPE_S2C_FINISH = 7
MSG_TYPE_C2S_FINISHED = 8

# Ours (100+ so they never collide with FedML's).
MSG_TYPE_C2S_JOIN = 101  # device announces itself: profile, manifest, backbone fingerprint, data stats
MSG_TYPE_S2C_JOIN_ACK = 102  # server accepts or refuses a join (MSG_ARG_KEY_ACCEPTED, MSG_ARG_KEY_REASON)
MSG_TYPE_C2S_ERROR = 103  # a device failed a round; the round goes on without it
MSG_TYPE_PRESENCE = 104  # never on the wire: a metering label for presence payloads (events.Presence)
MSG_TYPE_LOCAL_TIMER = 105  # retired: timers are local events (events.Timer); a frame of it is dropped
MSG_TYPE_S2C_MODEL = 106  # comm_args.model_delivery "shared": a round's global model, once, on the model topic

# --- parameter keys -------------------------------------------------------------------------------------
# FedML's (Message and MyMessage).
MSG_ARG_KEY_TYPE = "msg_type"
MSG_ARG_KEY_SENDER = "sender"
MSG_ARG_KEY_RECEIVER = "receiver"
MSG_ARG_KEY_MODEL_PARAMS = "model_params"  # the encoded tensor blob (wire.codec.encode_tensors)
MSG_ARG_KEY_NUM_SAMPLES = "num_samples"
MSG_ARG_KEY_CLIENT_INDEX = "client_idx"
MSG_ARG_KEY_CLIENT_STATUS = "client_status"
MSG_ARG_KEY_CLIENT_OS = "client_os"
MSG_ARG_KEY_TRAIN_CORRECT = "train_correct"
MSG_ARG_KEY_TRAIN_ERROR = "train_error"
MSG_ARG_KEY_TRAIN_NUM = "train_num_sample"
MSG_ARG_KEY_TEST_CORRECT = "test_correct"
MSG_ARG_KEY_TEST_ERROR = "test_error"
MSG_ARG_KEY_TEST_NUM = "test_num_sample"

# Ours.
MSG_ARG_KEY_MSG_ID = "msg_id"  # set by the transport; duplicates (QoS 1 redelivery) are dropped by it
MSG_ARG_KEY_ROUND = "round_idx"  # the round a message belongs to (metered per round)
MSG_ARG_KEY_MANIFEST_HASH = "manifest_hash"
MSG_ARG_KEY_MANIFEST = "manifest"  # Manifest.to_json(), sent once at join
MSG_ARG_KEY_ENCODING = "encoding"  # CommArgs.encoding of the blob
MSG_ARG_KEY_BACKBONE_FINGERPRINT = "backbone_fingerprint"
MSG_ARG_KEY_METRICS = "metrics"  # dict of per-round device metrics (loss, acc, timings, resources ...)
MSG_ARG_KEY_PROFILE = "profile"  # static device profile at join
MSG_ARG_KEY_DATA_STATS = "data_stats"
MSG_ARG_KEY_ACCEPTED = "accepted"
MSG_ARG_KEY_REASON = "reason"
MSG_ARG_KEY_ERROR = "error"
MSG_ARG_KEY_DEADLINE = "deadline"  # wall-clock seconds (time.time()) by which an update must arrive
MSG_ARG_KEY_SENT_AT = "sent_at"  # sender's wall clock just before publishing (transfer times)
MSG_ARG_KEY_CONFIG = "config"  # per-round training settings sent down (epochs, max_steps, lr ...)
MSG_ARG_KEY_TIMER = "timer"  # name of a local timer (MSG_TYPE_LOCAL_TIMER)
MSG_ARG_KEY_PRESENCE = "presence"  # "ONLINE" | "OFFLINE" (MSG_TYPE_PRESENCE)
MSG_ARG_KEY_PRESENCE_SINCE = "presence_since"  # the peer's clock when it published that presence (a session id)

PRESENCE_ONLINE = "ONLINE"
PRESENCE_OFFLINE = "OFFLINE"  # FedML's CommunicationConstants.MSG_CLIENT_STATUS_OFFLINE

SERVER_ID = 0  # FedML's convention: the server is rank 0; devices are 1..N (ints) or strings
MSG_ARG_KEY_ATTEMPT = "attempt"  # RoundTask.retry (sync) or RoundTask.task_number (async): the task's mode says
MSG_ARG_KEY_IS_DELTA = "is_delta"  # informational only: the server takes it from train_args.send_delta
MSG_ARG_KEY_EPSILON = "epsilon"  # a device's privacy spend so far
MSG_ARG_KEY_DEVICE_ID = "device_id"
MSG_ARG_KEY_MODEL_VERSION = "model_version"  # the global model's version a task carries (async staleness)
MSG_ARG_KEY_MODE = "round_mode"  # "sync" | "async"
MSG_ARG_KEY_MODEL_ID = "model_id"  # shared delivery: the model message a task's tensors come in
MSG_ARG_KEY_CLASS_NAMES = "class_names"  # optional: a device's class list at join, the run's in its JoinAck
MSG_ARG_KEY_MODEL_BYTES = "model_bytes"  # shared delivery: that model's encoded size (how long to wait for it)
MSG_ARG_KEY_RANK = "rank"  # a task's per-device rank (LoRA flexlora): train and send the first `rank` components
BROADCAST = "*"  # the receiver of a shared model message: every device of the run

STATUS_ONLINE = "ONLINE"
STATUS_BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"  # a device spent its privacy budget and leaves later rounds

CONFIG_KEY_EVALUATE = "evaluate"  # round config: evaluate the received global model on the local test split
