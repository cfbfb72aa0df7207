"""ProcessTracker stops what a block started, by PID, and leaves other processes alone."""

from __future__ import annotations

import subprocess
import sys

import psutil

from fedlora.run.processes import ProcessTracker


def test_tracker_stops_a_lingering_grandchild() -> None:
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with ProcessTracker(interval=0.1, grace=0.5) as tracker:
            # A child that starts a long-lived grandchild, lives 1 s, and exits (the grandchild is
            # re-parented away from us, as Ray's workers are when their raylet ends).
            code = (
                "import subprocess, sys, time; "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(1)"
            )
            subprocess.run([sys.executable, "-c", code], check=True)
            assert len(tracker.alive()) == 1  # the grandchild outlived its parent
        assert not tracker.alive()
        assert len(tracker.stopped) == 1  # stopped by PID on exit
        assert outsider.poll() is None  # started before the block: not ours to stop
    finally:
        outsider.kill()
        outsider.wait()


def test_tracker_waits_for_processes_that_end_by_themselves() -> None:
    with ProcessTracker(interval=0.1, grace=5) as tracker:
        child = psutil.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
        tracker.sample()
    assert not child.is_running()
    assert tracker.stopped == []  # it ended by itself within the grace period
