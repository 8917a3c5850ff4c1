"""The run file's format: its marker and versions, the tables' columns, the codes of coded columns and every
column's unit and description (mpi_afl/storage/runlog/__init__.py describes the layout). No h5py."""

FORMAT = "mpi_afl-run"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


class RunLogError(ValueError):
    """A run file is missing, foreign, damaged, truncated or of an unknown format version."""

ARRIVAL_FIELDS = [
    ("wall_time", "f8"),       # seconds since the run started
    ("virtual_time", "f8"),    # virtual-clock finish time of the job
    ("client", "i8"),
    ("rank", "i8"),            # worker rank that ran the job
    ("job", "i8"),
    ("base_version", "i8"),    # global version the job trained from
    ("version", "i8"),         # server version after processing the arrival
    ("staleness", "i8"),       # version at arrival - base_version
    ("weight", "f8"),          # aggregation weight, or FedRevive's beta (docs/algorithms.md §3.2)
    ("loss", "f8"),            # client's local training loss
    ("samples", "i8"),
    ("bytes", "i8"),           # update payload size
    ("server_seconds", "f8"),  # server time spent on this arrival
    ("compute_seconds", "f8"), # the worker's training time for the job (stragglers)
    ("accepted", "?"),
    ("reason", "i1"),          # REJECT_REASONS code
]
EVAL_FIELDS = [
    ("version", "i8"),
    ("wall_time", "f8"),
    ("virtual_time", "f8"),
    ("test_loss", "f8"),
    ("test_accuracy", "f8"),
    ("val_loss", "f8"),
    ("val_accuracy", "f8"),
]
TIMING_FIELDS = [
    ("version", "i8"),
    ("wall_time", "f8"),
    ("phase", "i1"),           # PHASES code
    ("seconds", "f8"),
]
KD_CHECK_FIELDS = [
    ("version", "i8"),         # server version the KD started from
    ("virtual_time", "f8"),
    ("staleness", "i8"),       # of the update the distilled step joins
    ("share", "f8"),           # eta * beta: how much of Delta_KD the blend applies
    ("loss_before", "f8"),     # held-out loss of x_t
    ("loss_after", "f8"),      # held-out loss of x_t + eta * beta * Delta_KD
]

# Why an arrival was not applied; rows pass the name, the file stores the code.
REJECT_REASONS = {
    "none": 0,        # accepted
    "size": 1,        # payload length does not match the model
    "client": 2,      # client id out of range or not the job's client
    "job": 3,         # unknown or duplicate job index, or sent by the wrong rank
    "version": 4,     # base version is not the job's, or lies in the future
    "nonfinite": 5,   # NaN/inf in the update or its loss
}
# Server time categories for timing rows.
PHASES = {
    "aggregate": 0,
    "distill": 1,
    "synthesize": 2,
    "eval": 3,
    "checkpoint": 4,
    "idle": 5,
    "dispatch": 6,
}

# (unit, description) of every column, stored in the file as the dataset attributes `<column>_unit` and
# `<column>_description` so a reader needs neither this package nor its source comments. Units: "s" wall
# seconds, "vt" virtual-time units of the delay model, "versions" global model versions, "" dimensionless.
COLUMN_DOCS = {
    "arrivals": {
        "wall_time": ("s", "wall time since the run started when the server finished processing the arrival"),
        "virtual_time": ("vt", "virtual-clock finish time of the job (NaN for an arrival that matches no job)"),
        "client": ("", "logical client id"),
        "rank": ("", "MPI rank of the worker that ran the job"),
        "job": ("", "job index (0, 1, ... in creation order)"),
        "base_version": ("versions", "global version the job trained from"),
        "version": ("versions", "server version after processing the arrival"),
        "staleness": ("versions", "version at processing time - base_version (-1 for a rejected unknown job)"),
        "weight": ("", "aggregation weight of the update, or the beta of FedRevive's blend (NaN when rejected)"),
        "loss": ("", "client's mean local training loss (cross-entropy)"),
        "samples": ("samples", "training samples the client holds"),
        "bytes": ("bytes", "update payload size (the float32 model delta; the message header is not counted)"),
        "server_seconds": ("s", "server time spent on this arrival, including any distillation it triggered"),
        "compute_seconds": ("s", "wall time of the job's local training on its worker, as the worker measured it "
                                 "(injected straggling excluded)"),
        "accepted": ("", "True when the update was passed to the algorithm"),
        "reason": ("", "why it was rejected: code of the reason_codes attribute (0 = none, accepted)"),
    },
    "evals": {
        "version": ("versions", "evaluated global version"),
        "wall_time": ("s", "wall time since the run started when the version was reached"),
        "virtual_time": ("vt", "virtual time when the version was reached"),
        "test_loss": ("", "mean cross-entropy on the test split"),
        "test_accuracy": ("", "fraction of the test split classified correctly"),
        "val_loss": ("", "mean cross-entropy on the validation split (NaN without one)"),
        "val_accuracy": ("", "fraction of the validation split classified correctly (NaN without one)"),
    },
    "timings": {
        "version": ("versions", "server version when the row was written"),
        "wall_time": ("s", "wall time since the run started when the row was written"),
        "phase": ("", "server activity: code of the phase_codes attribute"),
        "seconds": ("s", "server seconds spent in the phase since the previous evaluation (checkpoint: the write)"),
    },
    "kd_checks": {
        "version": ("versions", "global version x_t the distillation started from"),
        "virtual_time": ("vt", "virtual-clock finish time of the job whose arrival triggered the distillation"),
        "staleness": ("versions", "staleness of the update the distilled step is blended with (FedEcho: the "
                                  "buffered updates' mean, rounded)"),
        "share": ("", "eta * beta, the factor of Delta_KD in the new model (FedEcho: eta_kd * b, Delta_KD = "
                      "student - x')"),
        "loss_before": ("", "mean cross-entropy of x_t on the fixed held-out check images (distill.kd_check_images)"),
        "loss_after": ("", "the same for x_t + eta * beta * Delta_KD: below loss_before when KD carries knowledge "
                           "(FedEcho: loss_before is x', loss_after the corrected model)"),
    },
}

TABLES = {"arrivals": ARRIVAL_FIELDS, "evals": EVAL_FIELDS, "timings": TIMING_FIELDS, "kd_checks": KD_CHECK_FIELDS}
CODED_COLUMNS = {"arrivals": {"reason": REJECT_REASONS}, "timings": {"phase": PHASES}}


def updates_per_second(accepted: int, last_arrival_wall: float) -> float | None:
    """THE definition of a run's throughput, used by summary.json and the report alike: accepted updates
    divided by the wall time (since the start) at which the server finished processing the last arrival
    (the arrivals column `wall_time`). Start-up before the first job, the final checkpoint and the final
    evaluation are not counted."""
    return accepted / last_arrival_wall if last_arrival_wall > 0 else None
