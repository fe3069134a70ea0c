"""DDMTraining's logic with a real MRML scene (PyPI `slicer-core`: real nodes, no Qt, no app).

Two kinds of child process, both real:
- a small Python script that speaks ``ddm4d train --progress json`` (to check the process handling,
  event parsing and plot filling exactly and fast: stop, crash, stderr, log lines);
- the real ``ddm4d train`` on a tiny phantom data set: start, follow, stop mid-run (a checkpoint is
  saved), resume, finish, and load the model it wrote.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="the Slicer logic tests need the PyPI package slicer-core")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DDMTraining"))  # the module's Lib is not a pip package
sys.path.insert(0, str(ROOT / "DDMInterpolation"))  # DDMTraining depends on DDMInterpolation's Lib

from ddm4d.config import DDMConfig  # noqa: E402
from ddm4d.training import RUN  # noqa: E402
from ddm4d.phantom import write_dataset  # noqa: E402

from DDMTrainingLib import (DDMTrainingLogic, LossCurves, TrainingProcess, TrainingSettings,  # noqa: E402
                            TrainingStatus, formatDuration, parseEventLine)
from DDMTrainingLib import Constants as C  # noqa: E402
from DDMTrainingLib.Logic import processEnvironment, pythonExecutable, readSafetensorsMetadata  # noqa: E402

TIMEOUT_S = 120


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(1)


@pytest.fixture
def logic(scene):
    return DDMTrainingLogic(scene)


@pytest.fixture(scope="module")
def phantomData(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    write_dataset(folder, n_subjects=2, seed=0, size=(32, 32, 8))
    return folder


def pollUntil(process, condition=lambda events: False, timeout=TIMEOUT_S, curves=None):
    """Poll like the widget's timer until ``condition(all events so far)`` or the process ends."""
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = process.poll()
        if curves is not None:
            curves.update(new)
        events += new
        if condition(events) or not process.isRunning():
            return events
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"timed out after {timeout} s; events {[e['event'] for e in events]}; "
                         f"log: {process.logText()[-2000:]}")


def names(events):
    return [event["event"] for event in events]


# ------------------------------------------------------------------------------------------ a stand-in trainer
# A real process that prints the progress protocol of `ddm4d train --progress json`, writes checkpoints
# like it, saves one and reports "done" with "stopped" on a stop request (RUN_DIR/.stop) or SIGINT, and
# can crash on request.

STAND_IN = textwrap.dedent(r'''
    import json, os, signal, sys, time
    run, total, every, start, crash = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    os.makedirs(os.path.join(run, "checkpoints"), exist_ok=True)
    def emit(**event):
        print(json.dumps(event), flush=True)
    def checkpoint(it):
        path = os.path.join(run, "checkpoints", f"ckpt_{it:08d}.safetensors")
        meta = json.dumps({"__metadata__": {"format": json.dumps("ddm4d-training-state"),
                                            "state": json.dumps({"iteration": it})}}).encode()
        with open(path, "wb") as f:
            f.write(len(meta).to_bytes(8, "little") + meta)
        emit(event="checkpoint", iteration=it, path=path)
    emit(event="start", run_dir=run, method="ddm", device="cpu", iteration=start, total_iterations=total,
         epochs=total // 2, subjects=2, validation_subjects=0, config={})
    print("plain log line from the trainer", flush=True)
    print("a warning on stderr", file=sys.stderr, flush=True)
    it = start
    class Stop(Exception):
        pass
    try:
        while it < total:
            if os.path.exists(os.path.join(run, ".stop")):
                os.remove(os.path.join(run, ".stop"))
                raise Stop
            it += 1
            time.sleep(0.05)
            emit(event="iteration", iteration=it, epoch=(it - 1) // 2, loss=1.0 / it, diffusion=0.5 / it,
                 ncc=-0.1 * it, smooth=0.01, lr=2e-4, elapsed_s=0.05 * it, eta_s=0.05 * (total - it), it_per_s=20.0)
            if it % 2 == 0:
                emit(event="epoch", epoch=it // 2, iteration=it, loss=1.0 / it)
            if it % every == 0:
                checkpoint(it)
                emit(event="validation", iteration=it, loss=2.0 / it, ncc=-0.2, best=True)
            if crash == "crash" and it == 3:
                print("Traceback (most recent call last):", file=sys.stderr)
                print("RuntimeError: CUDA out of memory (stand-in)", file=sys.stderr, flush=True)
                sys.exit(1)
    except (KeyboardInterrupt, Stop) as stop:
        checkpoint(it)
        emit(event="done", iteration=it, model=os.path.join(run, "model.safetensors"), elapsed_s=0.05 * it,
             stopped=True)
        sys.exit(130 if isinstance(stop, KeyboardInterrupt) else 0)  # like ddm4d train, once the checkpoint is saved
    emit(event="done", iteration=it, model=os.path.join(run, "model.safetensors"), elapsed_s=0.05 * it, stopped=False)
''')


def standIn(runDirectory, total=6, every=3, start=0, crash="no"):
    args = [sys.executable, "-c", STAND_IN, str(runDirectory), str(total), str(every), str(start), crash]
    return TrainingProcess(args, runDirectory=runDirectory).start()


def test_events_are_parsed_and_plotted_as_they_come(scene, tmp_path):
    run = tmp_path / "run"
    process = standIn(run, total=6, every=3)
    curves = LossCurves(scene, "stand-in", runDirectory=run)
    events = pollUntil(process, curves=curves)
    assert process.returncode == 0 and not process.crashed()
    assert names(events) == ["start", "iteration", "iteration", "epoch", "iteration", "checkpoint", "validation",
                             "iteration", "epoch", "iteration", "iteration", "epoch", "checkpoint", "validation",
                             "done"]
    # non-JSON stdout and stderr lines are log text, never events
    assert "plain log line from the trainer" in process.logLines and "a warning on stderr" in process.logLines
    # the table has one row per iteration event and one column per loss; a series per loss in the chart
    assert curves.numberOfRows == 6
    assert curves.column(C.COLUMN_ITERATION) == [1, 2, 3, 4, 5, 6]
    assert curves.column("loss") == pytest.approx([1.0 / i for i in range(1, 7)])
    assert curves.column("ncc") == pytest.approx([-0.1 * i for i in range(1, 7)])
    assert curves.column("loss", validation=True) == pytest.approx([2.0 / 3, 2.0 / 6])
    chart = curves.chartNode
    assert chart.GetNumberOfPlotSeriesNodes() == len(C.TRAINING_LOSS_COLUMNS) + len(C.VALIDATION_LOSS_COLUMNS)
    for column in C.TRAINING_LOSS_COLUMNS:
        series = curves.seriesNodes[column]
        assert series.GetTableNode() is curves.trainingTableNode
        assert (series.GetXColumnName(), series.GetYColumnName()) == (C.COLUMN_ITERATION, f"{column} scaled")
        assert scene.IsNodePresent(series)
    assert curves.seriesNodes["validation loss"].GetTableNode() is curves.validationTableNode
    # terms of different scale drawn readably on one axis: each scaled to its range, the tables keep values
    assert curves.column("loss scaled") == pytest.approx([(1.0 / i - 1 / 6) / (1 - 1 / 6) for i in range(1, 7)])
    assert curves.column("ncc scaled") == pytest.approx([(6 - i) / 5 for i in range(1, 7)])  # -0.1 .. -0.6
    assert curves.column("smooth scaled") == pytest.approx([0.5] * 6)  # constant: mid-axis
    # training and validation of one term share a range: validation loss 2/3 and 1/3, training 1 .. 1/6
    assert curves.column("loss scaled", validation=True) == pytest.approx(
        [(2 / 3 - 1 / 6) / (1 - 1 / 6), (2 / 6 - 1 / 6) / (1 - 1 / 6)])
    assert chart.GetAttribute(C.ATTRIBUTE_RUN_DIRECTORY) == str(run)
    # the status follows the events
    status = process.status
    assert (status.iteration, status.totalIterations, status.done, status.stopped) == (6, 6, True, False)
    assert status.fraction == 1.0 and status.lastCheckpoint.endswith("ckpt_00000006.safetensors")
    assert "iteration 6 / 6" in status.progressText() and "loss 0.1667" in status.lossText()


def test_stop_saves_a_checkpoint_and_ends_cleanly(tmp_path):
    run = tmp_path / "run"
    process = standIn(run, total=10000, every=1000)
    events = pollUntil(process, lambda ev: sum(e["event"] == "iteration" for e in ev) >= 3)
    assert process.isRunning()
    process.stop(grace_s=20)
    events += pollUntil(process)
    assert not process.isRunning() and process.returncode == 0
    assert events[-1]["event"] == "done" and events[-1]["stopped"] is True
    assert names(events).count("checkpoint") == 1 and process.status.stopped and not process.crashed()
    assert list((run / "checkpoints").glob("*.safetensors"))


def test_stop_without_waiting_ends_a_stuck_process_tree_after_the_grace_period(tmp_path):
    """A child that ignores SIGINT, with a grandchild: both are gone after the grace period."""
    script = textwrap.dedent('''
        import signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        print(child.pid, flush=True)
        time.sleep(300)
    ''')
    process = TrainingProcess([sys.executable, "-c", script], runDirectory=tmp_path / "run").start()
    pollUntil(process, lambda ev: len(process.logLines) >= 1, timeout=30)
    grandchild = int(process.logLines[0])
    import psutil
    assert psutil.pid_exists(grandchild)
    started = time.monotonic()
    assert process.stop(grace_s=0.5, wait=False) is None  # returns at once
    assert time.monotonic() - started < 0.5
    pollUntil(process, timeout=30)
    assert process.returncode is not None and process.returncode < 0  # ended by a signal
    deadline = time.monotonic() + 10
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert not process.crashed()  # the user asked for it


def test_a_crash_is_reported_with_the_last_error_lines(tmp_path):
    run = tmp_path / "run"
    process = standIn(run, total=10, every=2, crash="crash")
    events = pollUntil(process)
    assert process.returncode == 1 and process.crashed()
    assert "RuntimeError: CUDA out of memory (stand-in)" in process.lastError()
    assert "checkpoint" in names(events)  # what was saved before the crash stays
    assert len(list((run / "checkpoints").glob("*.safetensors"))) == 1


def test_error_event_and_bad_command_are_reported(tmp_path):
    script = ('import json, sys; print(json.dumps({"event": "error", "message": "no GPU: use --device cpu"}));'
              'print("ddm4d train: error: no GPU: use --device cpu", file=sys.stderr); sys.exit(2)')
    process = TrainingProcess([sys.executable, "-c", script]).start()
    pollUntil(process)
    assert process.crashed() and process.returncode == 2
    assert process.lastError() == "no GPU: use --device cpu"  # the repeat on stderr is dropped
    with pytest.raises(OSError):
        TrainingProcess([str(tmp_path / "no-such-program")]).start()


def test_a_second_process_on_the_same_run_folder_is_refused(logic, phantomData, tmp_path):
    run = tmp_path / "run"
    first = standIn(run, total=10000, every=1000)
    try:
        with pytest.raises(ValueError, match="already writing to"):
            standIn(run)
        assert TrainingProcess.runningFor(run) is first
        with pytest.raises(ValueError, match="already writing to"):
            logic.startTraining(phantomData, run, TrainingSettings(iterations=2))
    finally:
        first.stop(grace_s=20)
    assert TrainingProcess.runningFor(run) is None


def test_a_live_lock_file_is_refused_and_a_stale_one_is_not(logic, phantomData, tmp_path):
    """RUN_DIR/.lock holds "pid host" (ddm4d train's RunLock)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / C.LOCK_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")  # this test process: alive
    with pytest.raises(ValueError, match=r"another training run \(process \d+\) is writing to"):
        logic.checkOutputDirectory(run)
    (run / C.LOCK_FILE).write_text(f"{os.getpid()} some-other-host\n")  # cannot be checked from here: refused
    with pytest.raises(ValueError, match="another training run"):
        logic.checkOutputDirectory(run)
    (run / C.LOCK_FILE).write_text(f"{2 ** 22 + 12345} {socket.gethostname()}\n")  # no such process
    state = logic.checkOutputDirectory(run)
    assert state.lockPid == 2 ** 22 + 12345 and not state.lockAlive


# ------------------------------------------------------------------------------------------ events and status

def test_parse_event_line():
    assert parseEventLine('{"event": "iteration", "iteration": 3, "loss": 0.5}') == {
        "event": "iteration", "iteration": 3, "loss": 0.5}
    assert parseEventLine('  {"event": "done", "iteration": 9, "model": "m", "stopped": false}\n')["event"] == "done"
    for line in ("", "Epoch 1/800", "{not json", "[1, 2]", '{"event": "unknown", "iteration": 1}',
                 '{"event": "iteration", "loss": 0.5}', '{"iteration": 1, "loss": 2}'):
        assert parseEventLine(line) is None, line


def test_status_texts_and_durations():
    status = TrainingStatus()
    assert status.fraction is None and status.progressText() == "starting..." and status.lossText() == ""
    status.update({"event": "start", "run_dir": "r", "iteration": 100, "total_iterations": 400, "epochs": 4})
    status.update({"event": "iteration", "iteration": 200, "epoch": 2, "loss": 0.25, "diffusion": 0.1,
                   "ncc": -0.5, "smooth": 0.01, "eta_s": 3725, "it_per_s": 2.5})
    assert status.startIteration == 100 and status.fraction == 0.5
    assert status.progressText() == "iteration 200 / 400 (epoch 2 / 4), 2.5 it/s, 1 h 02 min left"
    assert status.lossText() == "loss 0.25 (diffusion 0.1, NCC -0.5, smooth 0.01)"
    status.update({"event": "validation", "iteration": 200, "loss": 0.3, "ncc": -0.4, "best": True})
    assert status.lossText().endswith("validation loss 0.3 (best)")
    assert [formatDuration(s) for s in (5, 65, 3600, None, -1, float("nan"))] == [
        "5 s", "1 min 05 s", "1 h 00 min", "", "", ""]


def test_long_runs_keep_the_table_bounded_and_a_resume_drops_repeated_iterations(scene):
    curves = LossCurves(scene, "long", maxPoints=100)
    curves.update([{"event": "start", "run_dir": "r", "iteration": 0, "total_iterations": 1000}])
    curves.update([{"event": "iteration", "iteration": i, "loss": 1.0, "diffusion": 1.0, "ncc": 0.0, "smooth": 0.0}
                   for i in range(1, 1001)])
    iterations = curves.column(C.COLUMN_ITERATION)
    assert 50 <= len(iterations) <= 100 and iterations == sorted(iterations) and curves.stride > 1
    # a resume from the checkpoint at 500 repeats 501..: the rows after 500 go
    curves.update([{"event": "start", "run_dir": "r", "iteration": 500, "total_iterations": 1000}])
    assert max(curves.column(C.COLUMN_ITERATION)) <= 500
    # missing fields are NaN, not an error
    curves.update([{"event": "iteration", "iteration": 10000, "loss": 0.5}])
    curves.removeNodes()
    assert scene.GetNodesByClass("vtkMRMLPlotSeriesNode").GetNumberOfItems() == 0


def test_loss_curves_load_the_history_of_a_run(scene, tmp_path):
    log = tmp_path / C.LOG_FILE
    lines = [{"event": "start", "run_dir": str(tmp_path), "iteration": 0, "total_iterations": 9}]
    lines += [{"event": "iteration", "iteration": i, "loss": 1.0 / i, "diffusion": 0, "ncc": 0, "smooth": 0}
              for i in range(1, 6)]
    lines += [{"event": "start", "run_dir": str(tmp_path), "iteration": 3, "total_iterations": 9}]  # resumed at 3
    lines += [{"event": "iteration", "iteration": i, "loss": 2.0, "diffusion": 0, "ncc": 0, "smooth": 0}
              for i in range(4, 7)]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    curves = DDMTrainingLogic(scene).createLossCurves(tmp_path)
    assert curves.column(C.COLUMN_ITERATION) == [1, 2, 3, 4, 5, 6]
    assert curves.column("loss") == pytest.approx([1.0, 0.5, 1.0 / 3, 2.0, 2.0, 2.0])


# ------------------------------------------------------------------------------------------ settings

def test_settings_default_to_the_paper_and_map_to_train_options():
    paper = DDMConfig()
    settings = TrainingSettings()
    assert (settings.epochs, settings.lossLambda, settings.learningRate, settings.batchSize) == (
        paper.epochs, paper.loss_lambda, paper.lr, paper.batch_size)
    assert settings.trainOptions() == ["--epochs", str(paper.epochs), "--lambda", "20", "--lr", "0.0002",
                                       "--batch-size", "1", "--device", "auto", "--ema", "0.999"]
    assert settings.ema == RUN.ema  # the trainer's default, kept in step
    assert "--ema" in (off := TrainingSettings(ema=None).trainOptions()) and off[off.index("--ema") + 1] == "0"
    custom = TrainingSettings(iterations=12, checkpointEvery=3, seed=7, ema=0.999, augment=True,
                              validationFraction=0.5, size=(32, 32, 16), device="cpu")
    assert custom.trainOptions() == [
        "--iterations", "12", "--lambda", "20", "--lr", "0.0002", "--batch-size", "1", "--device", "cpu",
        "--checkpoint-every", "3", "--seed", "7", "--ema", "0.999", "--augment", "--validation-fraction", "0.5",
        "--size", "32", "32", "16"]


def test_settings_round_trip_through_strings_like_qsettings():
    custom = TrainingSettings(epochs=5, iterations=None, lossLambda=10.0, learningRate=1e-4, checkpointEvery=50,
                              seed=3, ema=0.99, augment=True, validationFraction=0.2, size=(64, 64, 16))
    assert TrainingSettings.fromDict(custom.toDict()) == custom
    asStrings = {key: ("@Invalid()" if value is None else " ".join(map(str, value)) if key == "size"
                       else str(value).lower() if isinstance(value, bool) else str(value))
                 for key, value in custom.toDict().items()}
    assert TrainingSettings.fromDict(asStrings) == custom
    assert TrainingSettings.fromDict({"epochs": "lots", "unknown": 1}) == TrainingSettings()
    assert TrainingSettings.fromDict({"learningRate": "-1"}) == TrainingSettings()  # invalid: defaults
    assert TrainingSettings.fromDict(None) == TrainingSettings()


@pytest.mark.parametrize("changes, message", [
    (dict(epochs=0), "epochs must be a whole number of at least 1"),
    (dict(iterations=0), "iterations must be"),
    (dict(learningRate=0.0), "learning rate must be in"),
    (dict(lossLambda=-1.0), "lambda"),
    (dict(batchSize=0), "batch size"),
    (dict(checkpointEvery=0), "checkpoint interval"),
    (dict(device="tpu"), "device must be one of auto, cpu, cuda"),
    (dict(ema=1.0), "EMA decay must be below 1"),
    (dict(validationFraction=1.0), "validation fraction must be below 1"),
    (dict(size=(32,)), "model grid size needs 2 or 3 values"),
    (dict(size=(32, 0, 8)), "each model grid size"),
])
def test_bad_settings_are_refused_before_any_process(logic, phantomData, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        logic.startTraining(phantomData, tmp_path / "run", TrainingSettings(**changes))
    assert not (tmp_path / "run").exists()  # refused before anything was made


# ------------------------------------------------------------------------------------------ data and folders

def test_check_data_reports_subjects_pairs_sizes_and_skipped(logic, tmp_path):
    write_dataset(tmp_path, n_subjects=3, seed=0, size=(32, 32, 8))
    (tmp_path / "patient002" / "Info.cfg").write_text("ED: 1\nNbFrame: 10\n")
    check = logic.checkData(tmp_path)
    assert (check.kind, check.numberOfSubjects, check.numberOfPairs, check.numberOfSkipped) == ("acdc", 2, 2, 1)
    assert check.subjects == ["patient001", "patient003"]
    assert check.problems[0][0] == "patient002" and "ES:" in check.problems[0][2]
    text = check.text()
    assert "2 usable subject(s), 2 training pair(s); 1 skipped." in text
    assert "32x32x8 (2)" in text and "spacings (mm)" in text and "patient002: Info.cfg: has no 'ES:'" in text
    json.dumps(check.summary)  # JSON-ready


def test_check_data_reads_a_pairs_csv(logic, tmp_path):
    write_dataset(tmp_path / "acdc", n_subjects=1, seed=0, size=(32, 32, 8))
    patient = tmp_path / "acdc" / "patient001"
    frames = sorted(p.name for p in patient.glob("patient001_frame??.nii.gz"))
    (tmp_path / "pairs.csv").write_text(f"source,target\nacdc/patient001/{frames[0]},acdc/patient001/{frames[1]}\n"
                                        "acdc/patient001/missing.nii.gz,acdc/patient001/missing.nii.gz\n")
    check = logic.checkData(tmp_path / "pairs.csv")
    assert (check.kind, check.numberOfPairs, check.numberOfSkipped) == ("pairs", 1, 1)
    assert "is missing" in check.text()


def bad_input(name, tmp_path, phantomData):
    """(data, run folder, resume, expected message) of each bad input."""
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    write_dataset(broken, n_subjects=1, seed=0, size=(32, 32, 8))
    (broken / "patient001" / "Info.cfg").write_text("nothing useful\n")
    aFile = tmp_path / "a-file.txt"
    aFile.write_text("x")
    finished = tmp_path / "finished"
    (finished / C.CHECKPOINTS_DIRECTORY).mkdir(parents=True)
    (finished / C.CHECKPOINTS_DIRECTORY / "ckpt_00000500.safetensors").write_bytes(b"state")
    run = tmp_path / "run"
    return {
        "no data folder": ("", run, False, "no data folder"),
        "missing folder": (tmp_path / "nowhere", run, False, "does not exist"),
        "empty folder": (empty, run, False, "no patient folders or pairs found"),
        "a file, not a folder": (aFile, run, False, "not a .csv"),
        "no valid pairs": (broken, run, False, "no valid training pairs.*patient001"),
        "no output folder": (phantomData, "", False, "no output folder"),
        "output is a file": (phantomData, aFile, False, "is a file"),
        "output not writable": (phantomData, aFile / "run", False, "not writable"),
        "previous run": (phantomData, finished, False, "holds a previous run.*iteration 500.*Resume"),
        "nothing to resume": (phantomData, run, True, "nothing to resume"),
    }[name]


BAD_INPUTS = ["no data folder", "missing folder", "empty folder", "a file, not a folder", "no valid pairs",
              "no output folder", "output is a file", "output not writable", "previous run", "nothing to resume"]


def childProcesses():
    import psutil
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_a_clear_message_and_start_no_process(logic, phantomData, tmp_path, name):
    data, run, resume, message = bad_input(name, tmp_path, phantomData)
    before = childProcesses()
    with pytest.raises(ValueError, match=message):
        logic.startTraining(data, run, TrainingSettings(iterations=2), resume=resume)
    assert childProcesses() <= before
    assert TrainingProcess.runningFor(run) is None if run else True


def test_model_list_helper_keeps_one_entry_per_existing_file(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    helper = DDMTrainingLogic.modelListWithModel
    assert helper(None, a) == [str(a)]
    assert helper(str(a), b) == [str(a), str(b)]  # QSettings gives a lone string for a one-item list
    assert helper([str(b), str(a), str(tmp_path / "gone.safetensors")], b) == [str(a), str(b)]


def test_the_model_list_key_is_the_one_ddminterpolation_reads():
    source = (ROOT / "DDMInterpolation" / "DDMInterpolation.py")
    text = source.read_text(encoding="utf-8")
    assert f'"{C.MODEL_LIST_SETTINGS_KEY}"' in text and f'"{C.SELECTED_MODEL_SETTINGS_KEY}"' in text


def test_child_environment_and_python(tmp_path):
    env = processEnvironment()
    import ddm4d
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(ddm4d.__file__).resolve().parents[1])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert pythonExecutable() == sys.executable
    args = DDMTrainingLogic().buildTrainCommand("DATA", "RUN", TrainingSettings(iterations=3), resume=True)
    assert args[:8] == [sys.executable, "-m", "ddm4d", "train", "DATA", "--out", "RUN", "--progress"]
    assert args[8] == "json" and args[-1] == "--resume"


def test_safetensors_metadata_is_read_without_torch(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = json.dumps({"__metadata__": {"format": json.dumps("ddm4d-model"), "note": "plain"}}).encode()
    path.write_bytes(len(meta).to_bytes(8, "little") + meta)
    assert readSafetensorsMetadata(path) == {"format": "ddm4d-model", "note": "plain"}
    (tmp_path / "bad.safetensors").write_bytes(b"PK\x03\x04 zip")
    with pytest.raises(ValueError, match="not a safetensors file"):
        readSafetensorsMetadata(tmp_path / "bad.safetensors")
    import ddm4d.checkpoint
    assert C.MODEL_FORMAT == ddm4d.checkpoint.MODEL_FORMAT


def test_run_folder_contract_is_the_trainers(logic, tmp_path):
    """The module reads RUN_DIR through ddm4d.runfolder, as the trainer writes it: the trainer's lock is
    seen as a live run, the checkpoints it names are listed, every event it can emit is parsed."""
    from ddm4d import runfolder
    from ddm4d.training.run import RunLock
    for name in ("MODEL_FILE", "BEST_MODEL_FILE", "CONFIG_FILE", "CHECKPOINTS_DIRECTORY", "CHECKPOINT_PATTERN",
                 "LOG_FILE", "LOSS_CURVE_FILE", "LOCK_FILE", "MODEL_FORMAT", "STATE_FORMAT"):
        assert getattr(C, name) == getattr(runfolder, name), name
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    lock.acquire(print)
    state = logic.runState(run)
    assert (state.lockPid, state.lockHost, state.lockAlive) == (os.getpid(), socket.gethostname(), True)
    lock.release()
    assert logic.runState(run).lockPid is None
    (run / C.CHECKPOINTS_DIRECTORY).mkdir()
    for iteration in (12, 7):
        (run / C.CHECKPOINTS_DIRECTORY / runfolder.checkpoint_name(iteration)).write_bytes(b"state")
    assert [i for i, _ in logic.runState(run).checkpoints] == [7, 12]
    for name, fields in runfolder.EVENT_FIELDS.items():
        event = runfolder.check_event({"event": name, **{field: kind() for field, kind in fields.items()}})
        assert parseEventLine(json.dumps(event)) == event, name
    with pytest.raises(ValueError, match="lacks"):
        runfolder.check_event({"event": "checkpoint", "iteration": 3})


def test_size_with_one_slice_is_a_2d_grid_and_a_resume_passes_only_what_may_change():
    assert TrainingSettings(size=(64, 64, 1)).trainOptions()[-3:] == ["--size", "64", "64"]
    settings = TrainingSettings(iterations=40, checkpointEvery=5, seed=3, lossLambda=10.0, size=(32, 32, 16),
                                device="cpu", augment=True)
    args = DDMTrainingLogic().buildTrainCommand("DATA", "RUN", settings, resume=True)
    assert args[9:] == ["--iterations", "40", "--device", "cpu", "--checkpoint-every", "5", "--resume"]


def test_run_state_lists_models_and_checkpoints_and_reads_the_run_settings(logic, tmp_path):
    run = tmp_path / "run"
    (run / C.CHECKPOINTS_DIRECTORY).mkdir(parents=True)
    for name in ("ckpt_00000010.safetensors", "ckpt_00000002.safetensors", "best.safetensors",
                 ".ckpt_00000012.safetensors.x.tmp", C.MODEL_FILE, C.BEST_MODEL_FILE):
        folder = run if name.startswith("model") else run / C.CHECKPOINTS_DIRECTORY
        (folder / name).write_bytes(b"x")
    state = logic.runState(run)
    assert [iteration for iteration, _ in state.checkpoints] == [2, 10] and state.lastIteration == 10
    assert state.canResume and state.modelPath == str(run / C.MODEL_FILE)
    assert [label for label, _ in state.modelChoices()] == [
        "Latest model (model.safetensors)", "Best validation model (model_best.safetensors)",
        "Checkpoint at iteration 10", "Checkpoint at iteration 2"]
    assert logic.runSettings(run) is None  # no config.json
    # the layout ddm4d train writes (config.json: "config" = DDMConfig, "run" = the run's own values)
    config = DDMConfig(image_size=(32, 32, 16), loss_lambda=10.0).to_dict()
    (run / C.CONFIG_FILE).write_text(json.dumps({"format": "ddm4d-run", "config": config, "run": {
        "seed": 4, "validation_fraction": 0.2, "augment": True, "ema": 0.99, "total_iterations": 30,
        "iterations_per_epoch": 2, "epochs": 15, "checkpoint_every": 5}}))
    assert logic.runSettings(run) == TrainingSettings(
        epochs=15, lossLambda=10.0, size=(32, 32, 16), seed=4, validationFraction=0.2, augment=True, ema=0.99,
        checkpointEvery=5)
    run2 = dict(json.loads((run / C.CONFIG_FILE).read_text()))
    run2["run"]["total_iterations"] = 7  # given as --iterations
    (run / C.CONFIG_FILE).write_text(json.dumps(run2))
    assert logic.runSettings(run).iterations == 7


def test_a_file_that_is_no_model_is_refused(logic, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="does not exist"):
        logic.trainedModel(run)
    run.mkdir()
    with pytest.raises(ValueError, match="holds no model yet"):
        logic.trainedModel(run)
    process = standIn(run, total=3, every=3)
    pollUntil(process)
    with pytest.raises(ValueError, match="not a ddm4d training checkpoint"):  # the stand-in's has no model inside
        logic.trainedModel(run)
    (tmp_path / "x.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="not a safetensors file"):
        logic.trainedModel(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------------ the real trainer

def requireTrainer():
    import importlib.util
    assert importlib.util.find_spec("ddm4d.training") is not None, "ddm4d.training (the `ddm4d train` command) is missing"


def test_real_training_stop_resume_finish_and_use_the_model(scene, logic, phantomData, tmp_path):
    """`ddm4d train` on a tiny phantom: follow it, stop it mid-run, resume it, and use its model."""
    requireTrainer()
    from ddm4d.checkpoint import load_model
    run = tmp_path / "run"
    settings = TrainingSettings(iterations=5, checkpointEvery=2, size=(16, 16, 16), seed=0, device="cpu")
    assert logic.checkData(phantomData).numberOfPairs == 2

    process = logic.startTraining(phantomData, run, settings)
    curves = logic.createLossCurves(run)
    events = pollUntil(process, lambda ev: any(e["event"] == "iteration" for e in ev), curves=curves)
    assert process.isRunning(), process.lastError()
    start = events[0]
    assert start["event"] == "start" and (start["iteration"], start["total_iterations"]) == (0, 5)
    assert start["subjects"] + start["validation_subjects"] == 2 and start["config"]["image_size"] == [16, 16, 16]
    assert logic.runState(run).lockPid == process.pid and logic.runState(run).lockAlive
    with pytest.raises(ValueError, match="already writing to"):
        logic.startTraining(phantomData, run, settings, resume=True)

    process.stop(grace_s=120)  # a stop request: the trainer finishes the iteration, saves a checkpoint, exits 0
    events += pollUntil(process, curves=curves)
    stoppedAt = process.status.iteration
    assert events[-1]["event"] == "done" and events[-1]["stopped"] is True and process.returncode == 0
    assert not process.crashed() and 1 <= stoppedAt < 5
    state = logic.runState(run)
    assert state.lastIteration == stoppedAt and state.canResume and state.modelPath and state.lockPid is None
    assert curves.column(C.COLUMN_ITERATION) == list(range(1, stoppedAt + 1))
    stoppedCheckpoint = state.lastCheckpoint
    shown = logic.runSettings(run)
    assert (shown.size, shown.seed, shown.checkpointEvery) == ((16, 16, 16), 0, 2)
    assert (shown.iterations or shown.epochs) == 5  # one training subject: 5 epochs of 1 iteration

    process = logic.startTraining(phantomData, run, settings, resume=True)
    resumed = pollUntil(process, curves=curves)
    assert resumed[0]["event"] == "start" and resumed[0]["iteration"] == stoppedAt
    assert resumed[-1]["event"] == "done" and resumed[-1]["stopped"] is False, process.lastError()
    assert process.returncode == 0 and not process.crashed() and process.status.iteration == 5
    assert curves.column(C.COLUMN_ITERATION) == [1, 2, 3, 4, 5]
    assert curves.numberOfValidationRows >= 1 and curves.chartNode.GetNumberOfPlotSeriesNodes() == 6
    assert all(value == value for value in curves.column("loss"))  # no NaN: every loss arrived
    for name in (C.MODEL_FILE, C.CONFIG_FILE, C.LOG_FILE, C.LOSS_CURVE_FILE):
        assert (run / name).is_file(), name

    model = logic.trainedModel(run)
    assert model == str(run / C.MODEL_FILE)
    assert load_model(model).config.image_size == (16, 16, 16)
    assert logic.modelListWithModel(None, model) == [model]
    # a checkpoint (a training state) gives its model too, exported once beside the run
    exported = logic.trainedModel(stoppedCheckpoint) if os.path.exists(stoppedCheckpoint) else \
        logic.trainedModel(logic.runState(run).lastCheckpoint)
    assert Path(exported).parent == run / C.EXPORTED_MODELS_DIRECTORY
    assert load_model(exported).config.image_size == (16, 16, 16)
    assert logic.trainedModel(stoppedCheckpoint if os.path.exists(stoppedCheckpoint) else
                              logic.runState(run).lastCheckpoint) == exported  # reused
    # DDMInterpolation accepts it as a model file (its model list holds paths of such files)
    sys.path.insert(0, str(ROOT / "DDMInterpolation"))
    try:
        from DDMInterpolationLib.Logic import DDMInterpolationLogic
    except ImportError:
        return
    assert DDMInterpolationLogic._checkModel(model, 0) == model
    assert DDMInterpolationLogic._checkModel(exported, 0) == exported


def test_data_check_and_start_run_in_the_background_with_progress(logic, phantomData, tmp_path):
    """The widget's "Check data" and Start read every subject: in a worker thread, with progress per
    subject, and a mistake comes back on the GUI thread as the same ValueError."""
    from DDMTrainingLib import BackgroundTask
    steps = []
    assert logic.checkData(phantomData, progress=lambda f, m: steps.append((f, m))).numberOfPairs == 2
    assert [f for f, _ in steps] == [0.0, 0.5] and steps[0][1] == "reading patient001 (1 of 2)"
    task = BackgroundTask(logic.checkData, str(phantomData))
    assert task.result(timeout=60).numberOfPairs == 2 and task.done and task.fraction == 0.5
    task = BackgroundTask(logic.checkData, str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="does not exist"):
        task.result(timeout=60)
    settings = TrainingSettings(iterations=1, checkpointEvery=1, size=(16, 16, 16), seed=0, device="cpu")
    task = BackgroundTask(logic.startTraining, phantomData, tmp_path / "run", settings)
    process = task.result(timeout=120)
    pollUntil(process)
    assert process.returncode == 0 and not process.crashed(), process.lastError()


def test_what_the_self_tests_run_without_torch_works_without_torch(tmp_path):
    """On the extension catalog's build machines there is no PyTorch: both modules' logic loads, and what
    their self-tests then run (inputs, data check, run folder, the ddm4d commands) works; torch is
    reported missing, so the generation and training tests are skipped there, not failed."""
    script = textwrap.dedent('''
        import os, sys
        sys.modules["torch"] = None  # importing torch fails, as where it is not installed
        root, folder = sys.argv[1], sys.argv[2]
        sys.path[:0] = [os.path.join(root, "DDMInterpolation"), os.path.join(root, "DDMTraining")]
        import slicer
        scene = slicer.vtkMRMLScene()
        slicer.mrmlScene = scene
        import DDMInterpolationLib, DDMTrainingLib
        from DDMInterpolationLib.Conversion import addVolumeNodeFromImage
        from ddm4d.phantom import make_subject, write_dataset
        s = make_subject(0, n_frames=4, size=(32, 32, 6))
        ed, es = (addVolumeNodeFromImage(scene, s.images[i], n) for i, n in ((s.ed, "ED"), (s.es, "ES")))
        labels = addVolumeNodeFromImage(scene, s.labels[s.ed], "labels", "vtkMRMLLabelMapVolumeNode")
        command = DDMInterpolationLib.DDMInterpolationLogic(scene).buildGenerateCommand(
            os.path.join(folder, "work"), ed, es, numberOfFrames=4, segmentationNode=labels, device="cpu")
        data, run = os.path.join(folder, "data"), os.path.join(folder, "run")
        write_dataset(data, n_subjects=2, seed=0, size=(32, 32, 8))
        logic = DDMTrainingLib.DDMTrainingLogic(scene)
        args = logic.buildTrainCommand(data, run, DDMTrainingLib.TrainingSettings(iterations=2))
        print(logic.checkData(data).numberOfPairs, logic.runState(run).canResume, args[2:4], command.args[2:4],
              DDMInterpolationLib.requirementsMet(), "torch" in sys.modules and sys.modules["torch"] is not None)
    ''')
    done = subprocess.run([sys.executable, "-c", script, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "2 False ['ddm4d', 'train'] ['ddm4d', 'generate'] False False"


LAUNCHER = Path(__file__).with_name("pythonslicer_like.py")


def processTree(process):
    import psutil
    return [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True)


def test_stop_behind_a_launcher_saves_a_checkpoint_and_ends_every_process(logic, phantomData, tmp_path):
    """Inside Slicer the trainer runs below the PythonSlicer launcher, which forwards no signals: Stop
    must still save a checkpoint, end every process, and return within the grace period."""
    requireTrainer()
    import psutil
    run = tmp_path / "run"
    settings = TrainingSettings(iterations=400, checkpointEvery=1000, size=(16, 16, 16), seed=0, device="cpu")
    args = logic.buildTrainCommand(str(phantomData), str(run), settings)
    process = TrainingProcess([args[0], str(LAUNCHER)] + args[1:], runDirectory=run,
                              env=processEnvironment()).start()
    events = pollUntil(process, lambda ev: any(e["event"] == "iteration" for e in ev))
    assert process.isRunning(), process.lastError()
    tree = processTree(process)
    assert len(tree) >= 2, "the trainer runs below the launcher"
    trainer = logic.runState(run).lockPid
    assert trainer != process.pid and trainer in [p.pid for p in tree]

    grace = 60.0
    started = time.monotonic()
    code = process.stop(grace_s=grace)
    assert time.monotonic() - started < grace
    events += pollUntil(process)
    assert code == 0 and not process.crashed(), process.lastError()
    assert events[-1]["event"] == "done" and events[-1]["stopped"] is True
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    state = logic.runState(run)
    assert state.lastIteration == events[-1]["iteration"] < 400 and state.lockPid is None
    assert not (run / C.LOCK_FILE).exists() and not (run / ".stop").exists()  # the request was honoured
    assert process.stopOutcome().startswith(f"Stopped at iteration {state.lastIteration}; saved ckpt_")


def test_stop_ends_a_tree_that_ignores_it_within_the_grace_period(tmp_path):
    """A worker that never reads the stop request (stuck) is ended with its launcher, grandchildren too."""
    import psutil
    run = tmp_path / "run"
    run.mkdir()
    stuck = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); " \
            "time.sleep(300)"
    process = TrainingProcess([sys.executable, str(LAUNCHER), "-c", stuck], runDirectory=run).start()
    deadline = time.monotonic() + 60
    while len(processTree(process)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = processTree(process)
    assert len(tree) == 3
    started = time.monotonic()
    process.stop(grace_s=2.0)
    assert time.monotonic() - started < 2.0 + 3 * C.KILL_GRACE_S
    assert not [p.pid for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not process.crashed()  # stopped by the user, ended by us
    assert "did not stop in time and was terminated" in process.stopOutcome()  # not "saved"


def test_real_trainer_failure_is_reported_with_its_message(logic, phantomData, tmp_path):
    """A run the trainer refuses (here: CUDA asked for on a machine without it) ends as a reported crash."""
    requireTrainer()
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the failure needs a machine without it")
    process = logic.startTraining(phantomData, tmp_path / "run", TrainingSettings(iterations=2, device="cuda"))
    events = pollUntil(process)
    assert process.crashed() and process.returncode == 2 and events[-1]["event"] == "error"
    assert "cuda" in process.lastError().lower(), process.lastError()
    assert logic.runState(tmp_path / "run").lockPid is None  # the trainer released its lock
