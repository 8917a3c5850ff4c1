"""Run log: one HDF5 file per run, written by rank 0 only, readable while the run goes on.

Layout (docs/design.md "Output"; the tables and codes are in schema.py, the writer `RunLog` in writer.py,
`read_run` and the resume check in reader.py):

- root attributes: whatever the server passes (config as JSON, versions,
  world size, seed, ...; dict and list values are stored as JSON strings)
  plus `format = "mpi_afl-run"` and `format_version`;
- four tables, each ONE resizable 1-D dataset with a compound dtype and
  Fletcher-32 checksums on its chunks (damaged rows are an error when read,
  never silently wrong values), one row per record: `arrivals` (ARRIVAL_FIELDS), `evals` (EVAL_FIELDS),
  `timings` (TIMING_FIELDS) and `kd_checks` (KD_CHECK_FIELDS). One compound dataset per table (rather than one
  dataset per column) means a live SWMR reader never sees half a row, and a
  flush is one resize + one write per table;
- coded columns hold small ints; the code tables are the module constants
  REJECT_REASONS (`arrivals.reason`) and PHASES (`timings.phase`), also
  stored as JSON in the dataset attributes `reason_codes` / `phase_codes` so
  the file decodes without this package;
- every column has a unit and a description (COLUMN_DOCS), stored as the
  dataset attributes `<column>_unit` and `<column>_description`.

All datasets are created before SWMR mode is switched on (an HDF5 rule), so
another process can follow a live run::

    f = h5py.File("run.h5", "r", swmr=True)
    arrivals = f["arrivals"]
    arrivals.refresh()                       # pick up rows flushed since
    df = pandas.DataFrame(arrivals[()])      # columns = ARRIVAL_FIELDS

or simply `read_run(path)`, which gives {table: {column: array}} and never
hangs on a damaged file (storage/h5open.py); a missing, foreign, damaged or
truncated file is a RunLogError naming the file.

Format versions: 1 had no checksums on the tables; 2 added them and the
`run_id` attribute that resume checks against the checkpoint; 3 added the
arrivals column `compute_seconds`. `read_run` reads all three; a run can only
be resumed with a version-3 log.

Observers (`attach`: the live TensorBoard and MLflow trackers of storage/tracking.py) get every row as it
is recorded, every flush and the close; on resume they first get the rows the log kept, so that they can
drop what they mirrored after the checkpoint, as the log does.

Rows are buffered in a Python list (a tuple per row) and written in one slice
per table when `flush_seconds` have passed, so logging costs 3-6 us per update
including the flushes (`bench/runlog_overhead.py`), far below 2% of a server
loop turn at hundreds of updates/s.

The names below are the package's surface; the columns, codes and format constants are imported from
schema.py, the resume check from reader.py.
"""

from .reader import read_run
from .schema import RunLogError
from .writer import RunLog

__all__ = ["RunLog", "RunLogError", "read_run"]
