"""What the benchmarks share (bench/common.py): a method measured in its own process does not
outlive the benchmark that started it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_benchmark_takes_its_measured_process_with_it():
    script = (f"import sys, time; sys.path.insert(0, {str(BENCH)!r}); from common import measure; "
              "measure('m', time.sleep, 120)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while not children and time.monotonic() < deadline:  # the spawned method process
            children = [c for c in psutil.Process(parent.pid).children()
                        if "spawn_main" in " ".join(c.cmdline())]
            time.sleep(0.1)
        assert children, "the measured process never started"
        time.sleep(1.0)  # past its start-up, into the method
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"still running after its benchmark was killed: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_report_is_written_as_json_markdown_and_plot_and_records_whether_it_drew(tmp_path, capsys,
                                                                                     monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from common import write_outputs

    def plot(report: dict, path: Path) -> bool:
        path.write_bytes(b"png")
        return True

    report = {"a": 1}
    text = write_outputs(tmp_path / "out", "r", report, lambda r: f"# a = {r['a']}\n", plot, indent=2)
    assert text == "# a = 1\n" and (tmp_path / "out" / "r.md").read_text() == text
    assert (tmp_path / "out" / "r.json").read_text() == '{\n  "a": 1,\n  "plot": true\n}\n'
    assert (tmp_path / "out" / "r.png").read_bytes() == b"png" and "# a = 1" in capsys.readouterr().out
    write_outputs(tmp_path / "none", "r", {"a": 2}, lambda r: "", plot, plot_key=None)
    assert (tmp_path / "none" / "r.json").read_text() == '{\n "a": 2\n}\n'
