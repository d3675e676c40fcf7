"""Job processes forked from the worker's preloaded server (jobs/prefork.py): each one is what a fresh
`python -m MODULE ARGS` would be — own session, its log, its environment, exit status — and the worker falls back
to a fresh interpreter whenever the server cannot be used.

The server must be forked from a process without threads, and pytest's (xdist's) has some: each case runs a short
driver script in its own interpreter, in a folder holding the module it launches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = '''
import json, os, signal, sys, time
print(json.dumps({"sid": os.getsid(0), "pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv[1:],
                  "cwd": os.getcwd(), "var": os.environ.get("PROBE_VAR"), "preloaded": "wave" in sys.modules,
                  "athanor_inherited": "athanor.jobs.prefork" in sys.modules, "path0": sys.path[0]}))
print("to stderr", file=sys.stderr)
if sys.argv[1] == "sleep":
    time.sleep(60)
sys.exit(int(sys.argv[1]))
'''

DRIVER = '''
import json, os, signal, sys, threading, time
from pathlib import Path
from athanor.jobs.prefork import Prefork

mode = sys.argv[1]
if mode == "threads":
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
if mode in ("threads", "switched_off"):
    print(json.dumps({"started": Prefork.start(preload=("wave",)) is not None}))
    sys.exit()
prefork = Prefork.start(preload=("wave",))
log = Path("job.log")
log.write_text("earlier line\\n")
out = {"server": prefork.server_pid, "me": os.getpid()}
if mode == "server_gone_before":
    os.kill(prefork.server_pid, signal.SIGKILL)
    time.sleep(0.5)
    out["launched"] = prefork.launch(["probe", "0"], dict(os.environ), log) is not None
    out["alive"] = prefork.alive
elif mode == "rank":
    import subprocess
    job = prefork.launch(["probe", "sleep"], dict(os.environ), log, new_session=False)
    time.sleep(2)
    out["pgid"], out["my_pgid"], out["running"] = os.getpgid(job.pid), os.getpgid(0), job.poll() is None
    try:
        job.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        out["timed_out"] = True
    job.terminate()
    out["code"] = job.wait(timeout=30)
else:
    job = prefork.launch(["probe", "sleep" if mode != "exit" else "3"], {**os.environ, "PROBE_VAR": "x"}, log)
    out["pid"] = job.pid
    if mode == "killed":
        time.sleep(3)
        os.killpg(job.pid, signal.SIGKILL)
    if mode == "server_gone_during":
        time.sleep(3)
        os.kill(prefork.server_pid, signal.SIGKILL)
        time.sleep(0.5)
        os.kill(job.pid, signal.SIGTERM)
    out["code"] = job.wait()
prefork.close()
print(json.dumps(out))
'''


def _drive(tmp_path: Path, mode: str, env: dict[str, str] | None = None) -> dict:
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "driver.py").write_text(DRIVER)
    done = subprocess.run([sys.executable, "driver.py", mode], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe_line(tmp_path: Path) -> dict:
    lines = (tmp_path / "job.log").read_text().splitlines()
    assert lines[0] == "earlier line"  # appended, as the job's log is across attempts
    return json.loads(next(line for line in lines if line.startswith("{")))


def test_a_forked_job_is_what_a_fresh_python_dash_m_would_be(tmp_path):
    out = _drive(tmp_path, "exit")
    probe = _probe_line(tmp_path)
    assert out["code"] == 3  # its exit status reaches the worker
    assert probe["pid"] == out["pid"] and probe["sid"] == probe["pid"]  # own session: cancel --force stops it all
    assert probe["ppid"] == out["server"] != out["me"]  # forked by the server, not by the worker
    assert probe["argv"] == ["3"] and probe["var"] == "x" and probe["cwd"] == str(tmp_path)
    assert probe["path0"] == str(tmp_path)  # `python -m` puts the working directory first
    assert probe["preloaded"]  # imported once by the server; a fresh interpreter never imports it
    assert not probe["athanor_inherited"]  # athanor is imported afresh by each job
    assert "to stderr" in (tmp_path / "job.log").read_text()  # stderr goes to the log as well


def test_a_job_killed_by_a_signal_reports_it(tmp_path):
    out = _drive(tmp_path, "killed")
    assert out["code"] == -9


def test_a_server_that_is_gone_means_a_fresh_interpreter(tmp_path):
    out = _drive(tmp_path, "server_gone_before")
    assert out["launched"] is False and out["alive"] is False  # spawn() then starts a fresh interpreter


def test_a_job_outlives_its_server_and_the_worker_still_waits_for_it(tmp_path):
    out = _drive(tmp_path, "server_gone_during")
    assert out["code"] == -1  # its status went with the server; the worker's own checks settle the job


@pytest.mark.parametrize("mode, env", [("threads", {}), ("switched_off", {"ATHANOR_PREFORK": "0"})])
def test_no_server_with_threads_running_or_when_switched_off(tmp_path, mode, env):
    assert _drive(tmp_path, mode, env) == {"started": False}


def test_a_rank_stays_in_the_callers_process_group_and_is_used_as_a_popen(tmp_path):
    out = _drive(tmp_path, "rank")
    assert out["pgid"] == out["my_pgid"]  # killing the job's group kills its ranks too
    assert out["running"] and out["timed_out"]  # poll() is None while it runs; wait(timeout) raises as Popen's
    assert out["code"] == -15  # terminate() is SIGTERM
