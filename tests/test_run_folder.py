"""The run folder: one owner at a time (its lock), no run inside another, a push checked before
the work, and what a run tells the user at its end (a stop after NaNs, the summary)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from test_checkpoint import subprocess_env, train_args, wait_for_steps
from test_train import tiny_config

from quietstar.cli.main import main as cli_main
from quietstar.training import checkpoint
from quietstar.training.metrics import read_metrics
from quietstar.training.recipe import TrainingDiverged, train
from quietstar.training.run_folder import diverged_message, enclosing_run, summary
from quietstar.training.run_lock import LOCK_NAME, RunFolderInUse, acquire, process_start


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    monkeypatch.setattr("quietstar.training.recipe.plot_training_curves", lambda *args: None)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time (a folder: its entries)."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns
                                         if p.is_file() else -1) for p in sorted(folder.rglob("*"))}


def write_lock(folder: Path, **owner) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "started": "2024-01-01 00:00:00",
                                "token": "x", **owner}))
    return lock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()  # reaped: the pid names no process now
    return process.pid


# ----------------------------------------------------------------------------- the lock
def test_a_second_run_on_a_folder_in_use_fails_fast_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_args(tiny_model_dir, out, "--max-steps", "100000",
                                        "--checkpoint-every", "100000"),
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(out, 2, first)
        first.send_signal(signal.SIGSTOP)  # holds still (and keeps its lock) while the second one runs
        before = snapshot(out)
        started = time.monotonic()
        try:
            second = subprocess.run(train_args(tiny_model_dir, out, "--max-steps", "5"), env=subprocess_env(),
                                    capture_output=True, text=True, timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        took = time.monotonic() - started
        assert snapshot(out) == before
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"quietstar train: error: {out} is in use by another quietstar train "
                               f"(pid {first.pid} ")
        assert "still running" in last and "Traceback" not in second.stderr
        assert "Loading" not in second.stderr, "refused only after loading the model"
        assert took < 120
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
        assert first.returncode == 130, stderr[-3000:]
    finally:
        if first.poll() is None:  # a failed assertion: leave no training behind
            first.kill()
            first.wait()
    assert not (out / LOCK_NAME).exists()  # released at the end of the run
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one run's records: each step once


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    write_lock(out, pid=pid, process_start=None)
    result = train(tiny_config(tiny_model_dir, out, max_steps=1))
    assert result.step == 1 and not (out / LOCK_NAME).exists()
    assert f"Took over {out / LOCK_NAME}: its run (pid {pid}, started 2024-01-01 00:00:00) is no longer running" \
        in (out / "train.log").read_text()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """The pid is alive (this process) but started at another time: a dead run's pid, reused."""
    if process_start(os.getpid()) is None:
        pytest.skip("no /proc: process start times are not known here")
    write_lock(tmp_path, pid=os.getpid(), process_start=process_start(os.getpid()) + 1)
    lock = acquire(tmp_path)
    assert lock.taken_over["pid"] == os.getpid() and lock.owner["token"] != "x"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_owner_or_another_hosts_lock_is_refused_with_the_way_out(tiny_model_dir, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "live"
        lock = write_lock(out, pid=sleeper.pid, process_start=process_start(sleeper.pid))
        before = snapshot(out), lock.read_text()
        with pytest.raises(RunFolderInUse, match=rf"is in use by another quietstar train \(pid {sleeper.pid} "
                                                 rf"on host .*still running\); wait for it"):
            train(tiny_config(tiny_model_dir, out, max_steps=1))
        assert (snapshot(out), lock.read_text()) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    out = tmp_path / "elsewhere"
    lock = write_lock(out, pid=1, host="another-machine")
    with pytest.raises(RunFolderInUse, match=rf"pid 1 on host another-machine.*cannot be checked from here; "
                                             rf"if that run is no longer running, delete {lock}"):
        train(tiny_config(tiny_model_dir, out, max_steps=1))
    assert lock.exists()
    damaged = write_lock(tmp_path / "damaged")
    damaged.write_text("")  # killed between creating the file and writing it
    with pytest.raises(RunFolderInUse, match=r"cannot be read \(damaged\?\); if no quietstar train"):
        train(tiny_config(tiny_model_dir, tmp_path / "damaged", max_steps=1))


def test_the_lock_is_released_after_an_error(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ValueError, match="unknown built-in corpus"):
        train(tiny_config(tiny_model_dir, out, data="builtin:poetry"))
    assert not (out / LOCK_NAME).exists()
    # A folder the failed run created is removed again, lock and all.
    with pytest.raises(ValueError, match="unknown built-in corpus"):
        train(tiny_config(tiny_model_dir, tmp_path / "new" / "run", data="builtin:poetry"))
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- nested folders
def test_an_output_folder_inside_a_run_or_a_checkpoint_is_refused(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    first = train(tiny_config(tiny_model_dir, run, max_steps=1))
    nested = run / "sub"
    code = cli_main(["train", "--model", str(tiny_model_dir), "--output-dir", str(nested), "--max-steps", "1"])
    assert code == 2 and not nested.exists()
    with pytest.raises(ValueError, match=rf"--output-dir {nested} lies inside the run folder {run}; "
                                         "a run folder must not be inside another run"):
        train(tiny_config(tiny_model_dir, nested, max_steps=1))
    inside = first.checkpoint / "eval-run"
    with pytest.raises(ValueError, match=rf"lies inside the checkpoint {first.checkpoint} \(of the run {run}\)"):
        train(tiny_config(tiny_model_dir, inside, max_steps=1))
    assert not inside.exists()
    # What makes a folder a run: a lock, a checkpoint folder, or train_config.yaml with a run's files.
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / LOCK_NAME).write_text("{}")
    (tmp_path / "copied" / "checkpoint-000010").mkdir(parents=True)
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "train_config.yaml").write_text("seq_len: 16\n")
    (tmp_path / "early" / "train.log").write_text("")
    for folder in ("locked", "copied", "early"):
        assert enclosing_run(tmp_path / folder / "a" / "b") == tmp_path / folder
    # A lone train_config.yaml is a settings file, not a run.
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "train_config.yaml").write_text("seq_len: 16\n")
    assert enclosing_run(tmp_path / "project" / "runs" / "a") is None


# ----------------------------------------------------------------------------- push to the Hub
class FakeHub:
    """huggingface_hub's HfApi and get_token, as far as a push uses them."""

    def __init__(self, monkeypatch, token="hf_token", whoami=None, upload_error=None):
        import huggingface_hub

        self.uploads = []
        hub = self

        class Api:
            def __init__(self, token=None):
                pass

            def whoami(self, token=None, **kwargs):
                if isinstance(whoami, BaseException):
                    raise whoami
                return whoami or {"name": "me", "auth": {"accessToken": {"role": "write"}}}

            def create_repo(self, repo_id, **kwargs):
                if upload_error is not None:
                    raise upload_error
                return f"https://huggingface.co/{repo_id}"

            def upload_folder(self, repo_id, folder_path, **kwargs):
                hub.uploads.append((repo_id, Path(folder_path)))

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)


class ConnectError(Exception):
    """What the Hub's HTTP client raises without a network (not an OSError)."""


def http_error(status: int):
    from huggingface_hub.errors import HfHubHTTPError

    return HfHubHTTPError(f"{status} Client Error", response=types.SimpleNamespace(
        headers={}, status_code=status, request=None))


@pytest.mark.parametrize("case, message", [
    ("offline", "needs the network, but the Hub is switched off .*HF_HUB_OFFLINE"),
    ("no_token", "needs a Hugging Face token with write access: log in with `hf auth login` or set HF_TOKEN"),
    ("bad_token", r"the Hub refuses the Hugging Face token \(401"),
    ("read_token", "the Hugging Face token can only read"),
    ("no_network", r"cannot reach the Hugging Face Hub \(ConnectError: Name or service not known\)"),
])
def test_a_push_that_cannot_happen_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch, case, message):
    FakeHub(monkeypatch, token=None if case == "no_token" else "hf_token", whoami={
        "bad_token": http_error(401), "no_network": ConnectError("Name or service not known"),
        "read_token": {"auth": {"accessToken": {"role": "read"}}}}.get(case))
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"--push-to-hub me/tiny: {message}" if case in
                       ("bad_token", "read_token", "no_network") else f"--push-to-hub me/tiny {message}"):
        train(tiny_config(tiny_model_dir, out, push_to_hub="me/tiny"))
    assert not out.exists()


def test_a_push_that_fails_at_the_end_keeps_the_model_and_says_how_to_push_it(tiny_model_dir, tmp_path,
                                                                             monkeypatch, capsys):
    hub = FakeHub(monkeypatch, upload_error=ConnectError("connection reset by peer"))
    out = tmp_path / "my run"
    code = cli_main(["train", "--model", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "1",
                     "--seq-len", "16", "--num-documents", "40", "--eval-every", "0", "--sample-every", "0",
                     "--sampled-thought-tokens", "2", "--ahead-tokens", "2", "--push-to-hub", "me/tiny"])
    assert code == 1 and hub.uploads == []  # trained and saved, not pushed
    model = out / "checkpoint-000001" / "model"
    assert (model / "model.safetensors").is_file()
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "Pushing to the Hub repo" in line)
    assert line == (f"Pushing to the Hub repo me/tiny failed (ConnectError: connection reset by peer); the "
                    f"model stays saved in {model}; push it later with: hf upload me/tiny '{model}' .")
    assert "Traceback" not in err and line in (out / "train.log").read_text()


# ----------------------------------------------------------------------------- the end of a run
def test_a_diverged_run_says_what_its_checkpoint_holds(tiny_model_dir, tmp_path):
    """A learning rate of 1e9: step 1 is finite but its update ruins the weights, the next steps
    are NaN. The checkpoint saved at the stop holds the weights after step 1, not good ones."""
    out = tmp_path / "run"
    config = tiny_config(tiny_model_dir, out, max_steps=10, learning_rate=1e9, checkpoint_every=1,
                         keep_checkpoints=1, max_nonfinite_steps=2)
    with pytest.raises(TrainingDiverged) as caught:
        train(config)
    message = str(caught.value)
    saved = checkpoint.latest_checkpoint(out)
    assert message.startswith(f"stopped at step 3: 2 steps in a row had a NaN/inf loss or gradient (skipped: "
                              f"they changed no weight). Saved {saved}: the weights after step 1, the last "
                              "finite step (loss ")
    assert "the weights before them" not in message
    assert "the weights were already damaged before the first NaN" in message
    scale = float(message.split("largest |weight| ")[1].split(" ")[0])
    assert scale > 1e6
    assert "Lower --learning-rate (now 1e+09)" in message
    assert message.endswith("start afresh (no checkpoint from before step 1 is kept)")
    # The stop deletes no older checkpoint (keep_checkpoints=1 notwithstanding).
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000003"]


def test_the_stop_message_names_only_checkpoints_from_before_the_damage(tmp_path):
    for step in (4, 8, 9, 10):
        (tmp_path / checkpoint.checkpoint_name(step)).mkdir()
    saved = tmp_path / checkpoint.checkpoint_name(10)
    good = {"step": 9, "loss": 2.5, "grad_norm": 1e7}
    damaged = diverged_message(step=10, streak=1, saved=saved, last_good=good, start_step=0,
                               weight_scale=(5e4, 1.2), learning_rate=1e-2)
    assert "largest |weight| 5e+04 (1.2 at step 0)" in damaged
    assert damaged.endswith(f"resume from a checkpoint saved before step 9 (kept: checkpoint-000004, "
                            f"checkpoint-000008: --resume {tmp_path / 'checkpoint-000008'}), or start afresh")
    intact = diverged_message(step=10, streak=1, saved=saved, last_good=good, start_step=0,
                              weight_scale=(1.5, 1.2), learning_rate=1e-2)
    assert intact.endswith(f"then continue with --resume {saved}")
    unknown = diverged_message(step=10, streak=1, saved=saved, last_good=None, start_step=8,
                               weight_scale=None, learning_rate=1e-2)
    assert "the weights this run started from at step 8" in unknown and "may already be damaged" in unknown
    assert "kept: checkpoint-000004:" in unknown


def write_metrics(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_summary_of_a_short_run_compares_steps_that_differ(tmp_path):
    write_metrics(tmp_path, [{"step": s, "base_nll": 4.0 - s, "model_nll": 3.5 - s} for s in (1, 2, 3)])
    text = summary(tmp_path, last_checkpoint=None, step=3, start_step=0, elapsed=2, interrupted=False)
    assert "mean of 5 steps" not in text
    assert "Training NLL, mean of step 1 -> step 3: 3.000 -> 1.000 without thought, 2.500 -> 0.500 with" in text
    write_metrics(tmp_path, [{"step": 1, "base_nll": 4.0, "model_nll": 3.5}])
    one = summary(tmp_path, last_checkpoint=None, step=1, start_step=0, elapsed=2, interrupted=False)
    assert "Training NLL" not in one  # nothing to compare


def test_the_summary_lists_only_files_that_exist(tmp_path):
    write_metrics(tmp_path, [])
    text = summary(tmp_path, last_checkpoint=tmp_path / "checkpoint-000001", step=1, start_step=0, elapsed=1,
                   interrupted=False)
    assert "samples.md" not in text and "training_curves.png" not in text and "checkpoint-000001" not in text
    assert "metrics.jsonl   every step's numbers" in text
    (tmp_path / "samples.md").write_text("# Thoughts")
    assert "samples.md   sampled thoughts" in summary(tmp_path, last_checkpoint=None, step=1, start_step=0,
                                                     elapsed=1, interrupted=False)


def test_the_summary_of_a_resumed_run_covers_the_whole_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    settings = dict(eval_every=2, eval_batches=1, eval_documents=5)
    train(tiny_config(tiny_model_dir, out, max_steps=2, **settings))
    result = train(tiny_config(tiny_model_dir, out, max_steps=4, resume="latest", **settings))
    records = read_metrics(out / "metrics.jsonl")
    start, end = records[0], records[-1]
    assert (start["step"], end["step"]) == (0, 4)
    log = (out / "train.log").read_text()
    last = log[log.rindex("Done:"):]
    assert last.startswith("Done: 2 steps in ") and "(steps 3-4; resumed at step 2)." in last
    assert (f"Held-out NLL, step 0 -> step 4: {start['eval/nll_without_thought']:.4f} -> "
            f"{end['eval/nll_without_thought']:.4f} without thought, {start['eval/nll_with_thought']:.4f} -> "
            f"{end['eval/nll_with_thought']:.4f} with thought") in last
    assert start["eval/nll_without_thought"] != end["eval/nll_without_thought"]
    assert "Training NLL, mean of steps 1-2 -> steps 3-4" in last
    assert "samples.md" not in last and f"{result.checkpoint.name}/model" in last


def _race_for_the_lock(folder, start, done, results):
    start.wait()
    try:
        lock = acquire(folder)
    except RunFolderInUse:
        results.put("refused")
        return
    results.put("took it")
    done.wait(60)  # hold it while the others try
    lock.release()


def test_processes_racing_for_a_dead_runs_lock_leave_exactly_one_owner(tmp_path):
    import multiprocessing

    write_lock(tmp_path, pid=dead_pid(), process_start=None)  # every racer takes the takeover path
    context = multiprocessing.get_context("fork")
    start, done, results = context.Event(), context.Event(), context.Queue()
    racers = [context.Process(target=_race_for_the_lock, args=(tmp_path, start, done, results))
              for _ in range(6)]
    for racer in racers:
        racer.start()
    start.set()
    outcomes = sorted(results.get(timeout=60) for _ in racers)
    done.set()
    for racer in racers:
        racer.join(60)
    assert outcomes == ["refused"] * 5 + ["took it"]
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.iterdir())  # released, no takeover file
