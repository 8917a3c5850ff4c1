"""The run's lines (mpi_afl/console.py): `TIME LEVEL TAG MESSAGE` on stdout and in OUT/server.log, the plain
error line on stderr, progress lines in version order, --quiet and --verbose, and the stop line after Ctrl-C."""

import re
import signal

from mpi_afl import console
from mpi_helpers import FAST, HANG_GUARD, launch, start, wait_until

LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) (\[server\]|mpi_afl:) \S")
PROGRESS = re.compile(r" INFO \[server\] version +(\d+)")


def _versions(text: str) -> list[int]:
    return [int(m.group(1)) for line in text.splitlines() if (m := PROGRESS.search(line))]


def test_progress_lines_come_in_version_order_on_stdout_and_in_server_log(tmp_path):
    """One process: an evaluation waits in the queue while the run goes on (server/evaluator.py), and a heartbeat
    every loop turn (heartbeat_seconds tiny) must not report a version ahead of it."""
    out = tmp_path / "run"
    proc = launch(1, [*FAST, "--max-versions", "30", "--run.heartbeat_seconds=0.001", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    log = (out / "server.log").read_text()
    assert proc.stdout.splitlines() == log.splitlines() and proc.stderr == ""
    assert all(LINE.match(line) for line in log.splitlines()), log
    for text in (proc.stdout, log):
        versions = _versions(text)
        assert versions == sorted(versions) and {10, 20, 30} <= set(versions), versions
    evaluations = [line for line in log.splitlines() if "test acc" in line]
    assert [int(PROGRESS.search(line).group(1)) for line in evaluations] == [10, 20, 30]
    assert any("heartbeat" in line for line in log.splitlines())


def test_quiet_shows_warnings_only_and_server_log_keeps_every_line(tmp_path):
    out = tmp_path / "run"
    proc = launch(1, [*FAST, "--algorithm", "fedrevive", "--max-versions", "5", "--quiet", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    (warning,) = proc.stdout.splitlines()   # run/finish.py never_distilled
    assert LINE.match(warning) and " WARNING [server] warning: fedrevive never applied its distillation" in warning
    log = (out / "server.log").read_text()
    assert " INFO [server] done (max_versions): 5 versions" in log and _versions(log) and warning in log
    assert "DEBUG" not in log


def test_verbose_and_the_stop_line_after_ctrl_c(tmp_path):
    """SIGINT to a one-process run: the stop line says how to continue; --verbose adds a line per arrival."""
    out = tmp_path / "run"
    proc = start(1, [*FAST, "--max-versions", "100000", "--verbose", "--out", str(out)])
    try:
        assert wait_until(lambda: (out / "server.log").exists() and " arrival: " in (out / "server.log").read_text())
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    log = (out / "server.log").read_text()
    for text in (stdout, log):
        assert re.search(r" DEBUG \[server\] arrival: job \d+ from rank 0 \(client \d+\), base version \d+", text)
        assert re.search(r" INFO \[server\] signal SIGINT: checkpointing and stopping", text), text[-2000:]
        assert f" INFO [server] continue it with: mpi-afl train --resume {out}\n" in text
    assert all(LINE.match(line) for line in stdout.splitlines()), stdout[-2000:]


def test_error_is_the_plain_line_on_stderr_and_stamped_in_server_log(tmp_path, capsys):
    console.log_to(tmp_path / "server.log")
    try:
        console.error("the run diverged")
        console.server.info("version 3")
    finally:
        console.close_log()
    captured = capsys.readouterr()
    assert captured.err == "mpi_afl: error: the run diverged\n"
    assert LINE.match(captured.out) and captured.out.endswith(" INFO [server] version 3\n")
    first, second = (tmp_path / "server.log").read_text().splitlines()
    assert LINE.match(first) and first.endswith(" ERROR mpi_afl: error: the run diverged") and LINE.match(second)
