"""How multi-process runs end: a finished run exits 0, a stopped one 143, a failed one promptly
non-zero, on every rank, and never with an abort at exit.

The ranks are started here as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, ...), one
process each, so that every rank's own exit status can be checked; the stress test goes through
torchrun itself (benchmarks/stress_exit.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import stress_exit  # noqa: E402

ABORTED = ("terminate called", "Fatal Python error", "core dumped")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(model, train, held_out): the tiny model and a small synthetic question set."""
    return stress_exit.build_demo_inputs(tmp_path_factory.mktemp("demo"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(per_rank_args: list[list[str]], log_dir: Path) -> list[subprocess.Popen]:
    """One ``train.py`` process per rank, wired together as torchrun wires them."""
    port = free_port()
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "OMP_"))}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(per_rank_args)),
                   LOCAL_WORLD_SIZE=str(len(per_rank_args)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        log = (log_dir / f"rank{rank}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> tuple[list[int | None], list[float]]:
    """(each rank's exit status, the time it exited); a rank still running at the deadline is killed
    and reads None."""
    deadline = time.time() + timeout_s
    ended: dict[int, float] = {}
    while len(ended) < len(procs) and time.time() < deadline:
        for rank, p in enumerate(procs):
            if rank not in ended and p.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.05)
    codes = []
    for rank, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait()
            codes.append(None)
        else:
            codes.append(p.returncode)
    return codes, [ended.get(rank, deadline) for rank in range(len(procs))]


def logs(log_dir: Path, n: int) -> list[str]:
    return [(log_dir / f"rank{r}.log").read_text(errors="replace") for r in range(n)]


def run_args(demo, out: Path, *extra: str, train: Path | None = None) -> list[str]:
    model, good_train, held_out = demo
    command = stress_exit.train_command(2, model, train or good_train, held_out, out)
    return command[command.index("--config"):] + list(extra)


@pytest.mark.slow
def test_finished_two_process_runs_and_evaluations_all_exit_0(tmp_path):
    """Complete torchrun launches of train.py and evaluate.py, several in a row: every one
    exits 0 (a rank that aborts at exit fails its launch)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "stress_exit.py"), "--train-runs", "4",
                           "--eval-runs", "2", "--work", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 of 6 launches of 2 processes exited 0" in proc.stdout


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_143_after_saving(demo, tmp_path):
    """A scheduler's SIGTERM to both ranks: they finish the same step, write its checkpoint,
    and each exits 143 (128 + SIGTERM), with no abort at exit."""
    out = tmp_path / "run"
    args = run_args(demo, out, "run.steps=50", "checkpointing.every=0", "data.eval_samples=4")
    procs = launch([args, args], tmp_path)
    deadline = time.time() + 600
    history = out / "history.jsonl"
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if history.is_file() and len(history.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes, _ = wait_all(procs, 600)
    text = logs(tmp_path, 2)
    assert codes == [143, 143], text
    assert not any(mark in t for t in text for mark in ABORTED), text
    stopped_at = len(history.read_text().splitlines())
    assert stopped_at < 51, "the run ended before the signal: nothing was tested"
    assert json.loads((out / "checkpoints" / f"step_{stopped_at}" / "trainer_state.json").read_text())["step"] == stopped_at


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_every_rank_promptly_and_non_zero(demo, tmp_path):
    """Rank 1 meets an undecodable clip in its first step while rank 0 waits for it in a
    collective: rank 1 reports the clip in one line, and rank 0 exits non-zero within seconds of
    it, not at the collective time-out, and neither aborts."""
    _, good_train, _ = demo
    broken_clip = tmp_path / "broken.wav"
    broken_clip.write_bytes(b"RIFF but not a wav file at all" * 10)
    rows = [json.loads(line) for line in good_train.read_text().splitlines()]
    broken_train = tmp_path / "train-broken.jsonl"
    broken_train.write_text("".join(json.dumps({**row, "audio_path": str(broken_clip)}) + "\n" for row in rows))

    out = tmp_path / "run"
    # a 5-minute collective time-out: a rank left waiting for it would show in when it exits
    common = ["run.steps=5", "checkpointing.every=0", "distribution.timeout_minutes=5"]
    procs = launch([run_args(demo, out, *common), run_args(demo, out, *common, train=broken_train)], tmp_path)
    codes, ended = wait_all(procs, 900)
    text = logs(tmp_path, 2)
    assert all(code not in (0, None) for code in codes), (codes, text)
    assert -signal.SIGABRT not in codes and not any(mark in t for t in text for mark in ABORTED), text
    assert "broken.wav" in text[1] and "error:" in text[1], text[1][-2000:]
    assert ended[0] - ended[1] < 60, f"rank 0 ended {ended[0] - ended[1]:.0f} s after rank 1: it waited for the time-out"
