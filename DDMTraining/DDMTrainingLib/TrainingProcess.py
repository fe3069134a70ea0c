"""A ``ddm4d train`` run in a background process, read without blocking (no Qt).

The child runs hidden in its own process group (POSIX: a new session). Inside Slicer it is the
PythonSlicer launcher, which runs the real trainer as its child and forwards no signals: Stop is a
request file in the run folder (read by the trainer between iterations), and what does not end within
the grace period is ended as a tree (process group and every descendant).
Two reader threads read its output: JSON progress lines from stdout become events in a
``queue.Queue``; every other line (stdout or stderr) goes to a bounded log buffer. The owner
drains the queue with :meth:`TrainingProcess.poll` from wherever it likes (the widget: a
``qt.QTimer`` every 200 ms; tests and the console: a loop), so the GUI never waits on the child.
"""
import collections
import logging
import os
import queue
import signal
import subprocess
import threading
import time

from DDMInterpolationLib.BackgroundProcess import descendants, endProcessTree, hiddenProcessOptions
from ddm4d import runfolder

from .Constants import ERROR_LINES, KILL_GRACE_S, LOG_LINES, STOP_GRACE_S
from .Events import TrainingStatus, parseEventLine

_EVENT, _LOG, _STDERR = "event", "log", "stderr"


def _running(process):
    """A psutil process that runs (a zombie has ended)."""
    try:
        import psutil
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except Exception:  # NoSuchProcess: ended
        return False


def _normalized(path):
    return os.path.normcase(os.path.realpath(os.fspath(path))) if path else None


class TrainingProcess:
    """One training process.

    :param args: the command line (list), e.g. from ``DDMTrainingLogic.buildTrainCommand``.
    :param runDirectory: the run's output folder (used to refuse a second run on it).
    :param env: the full environment of the child (None: inherit).
    :param maxLogLines: how many log lines :attr:`logLines` keeps.
    """

    _running = {}  # normalized run folder -> TrainingProcess, for every live process of this Python
    _runningLock = threading.Lock()

    def __init__(self, args, runDirectory=None, env=None, cwd=None, maxLogLines=LOG_LINES):
        self.args = [str(arg) for arg in args]
        self.runDirectory = os.fspath(runDirectory) if runDirectory is not None else None
        self.env = env
        self.cwd = cwd
        self.process = None
        self.status = TrainingStatus()
        self.logLines = collections.deque(maxlen=maxLogLines)
        self.newLogLines = []  # the log lines the last poll() read (the widget appends them to its view)
        self.stopRequested = False
        self._stderrTail = collections.deque(maxlen=ERROR_LINES)
        self._queue = queue.Queue()
        self._readers = []
        self._killDeadline = None
        self._tree = []  # descendants of the process when a stop began (psutil)
        self._forced = False  # the tree was terminated (the trainer did not stop in time, or kill())

    # ---------------------------------------------------------------------------------------------- start

    @classmethod
    def runningFor(cls, runDirectory):
        """The live TrainingProcess of this Python process writing to ``runDirectory``, or None."""
        key = _normalized(runDirectory)
        with cls._runningLock:
            process = cls._running.get(key)
        if process is not None and not process.isAlive():
            process._unregister()
            return None
        return process

    def start(self):
        """Start the child process and its reader threads; returns self.

        :raises ValueError: another TrainingProcess of this Python process runs on the same folder.
        :raises OSError: the program could not be started.
        """
        if self.process is not None:
            raise RuntimeError("this TrainingProcess was started already; make a new one to train again")
        key = _normalized(self.runDirectory)
        with self._runningLock:
            other = self._running.get(key) if key else None
            if other is not None and other.isAlive():
                raise ValueError(f"a training run is already writing to {self.runDirectory} (process {other.pid}); "
                                 "stop it first or choose another output folder")
            if self.runDirectory:
                runfolder.clear_stop(self.runDirectory)  # a request left by an earlier run must not stop this one
            self.process = subprocess.Popen(
                self.args, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1,
                **hiddenProcessOptions())
            if key:
                self._running[key] = self
        for stream, kind in ((self.process.stdout, _EVENT), (self.process.stderr, _STDERR)):
            reader = threading.Thread(target=self._read, args=(stream, kind), daemon=True,
                                      name=f"ddm4d-train-{kind}-{self.process.pid}")
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, stream, kind):
        try:
            for line in iter(stream.readline, ""):
                line = line.rstrip("\r\n")
                if kind == _EVENT:
                    event = parseEventLine(line)
                    self._queue.put((_EVENT, event) if event is not None else (_LOG, line))
                else:
                    self._queue.put((_STDERR, line))
        finally:
            stream.close()

    # ---------------------------------------------------------------------------------------------- state

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    @property
    def returncode(self):
        """The exit code once the process has ended, else None (negative: ended by that signal)."""
        return None if self.process is None else self.process.poll()

    def isAlive(self):
        """True while the operating-system process runs (its output may still be unread)."""
        return self.process is not None and self.process.poll() is None

    def isRunning(self):
        """True while the process runs or output of it is still to be read by :meth:`poll`."""
        if self.process is None:
            return False
        return (self.process.poll() is None or any(reader.is_alive() for reader in self._readers)
                or not self._queue.empty())

    def poll(self):
        """Every event parsed since the last call (list of dicts, in order); never blocks.

        Log lines go to :attr:`logLines` (those of this call also to :attr:`newLogLines`);
        :attr:`status` follows the events. Also carries out a
        pending stop: once the grace period of ``stop(wait=False)`` is over, the tree is ended.
        """
        events = []
        self.newLogLines = []
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == _EVENT:
                self.status.update(payload)
                events.append(payload)
            else:
                self.logLines.append(payload)
                self.newLogLines.append(payload)
                if kind == _STDERR:
                    self._stderrTail.append(payload)
        if self._killDeadline is not None and self._treeAlive() and time.monotonic() >= self._killDeadline:
            logging.warning(f"ddm4d train (process {self.pid}) did not stop within the grace period; terminating it")
            self._killDeadline = None
            self._terminateTree()
        if self.process is not None and not self.isAlive():
            self._unregister()
        return events

    def crashed(self):
        """True when the process has ended with an error, not by finishing or by a requested stop.

        ``ddm4d train`` exits 0 when done, and 130 / 143 after SIGINT / SIGTERM once its checkpoint is
        saved (its "done" event then says ``"stopped": true``).
        """
        code = self.returncode
        if code is None or self.isRunning():
            return False
        if self.status.errorMessage is not None:
            return True
        if self.status.done:
            return code not in (0, 128 + signal.SIGINT, 128 + signal.SIGTERM)
        # no "done" event: fine only when the user stopped it and it was ended by a signal or by us
        if self.stopRequested and self._forced:
            return False
        return not (self.stopRequested and code in (-signal.SIGINT, -signal.SIGTERM,
                                                     128 + signal.SIGINT, 128 + signal.SIGTERM))

    def stopOutcome(self):
        """What a stop really did, for the user: a checkpoint the trainer confirmed, or an ended tree."""
        status = self.status
        saved = os.path.basename(status.lastCheckpoint) if status.lastCheckpoint else None
        if status.stopped:
            return f"Stopped at iteration {status.iteration}; saved {saved or 'a checkpoint'}. Resume continues."
        since = f"from {saved}" if saved else "from the start (no checkpoint was saved)"
        return (f"Ended at iteration {status.iteration}: the trainer did not stop in time and was terminated, "
                f"without a checkpoint of this iteration. Resume continues {since}.")

    def lastError(self):
        """What went wrong, for the user: the error event's message and the last stderr lines."""
        lines = []
        if self.status.errorMessage:
            lines.append(self.status.errorMessage)
        message = self.status.errorMessage
        lines.extend(line for line in self._stderrTail  # the CLI repeats the error event's message on stderr
                     if line.strip() and not (message and message in line))
        if not lines and self.returncode not in (None, 0):
            lines.append(f"ddm4d train ended with exit code {self.returncode} and printed no error")
        return "\n".join(lines)

    def logText(self):
        return "\n".join(self.logLines)

    # ---------------------------------------------------------------------------------------------- stop

    def stop(self, grace_s=STOP_GRACE_S, wait=True):
        """Ask the trainer to save a checkpoint and exit; end the whole process tree if it does not.

        The request is a stop file in the run folder, which the trainer reads between iterations: it
        works on every platform and reaches the trainer behind the PythonSlicer launcher, which
        forwards no signals (without a run folder: SIGINT to the process group, CTRL_BREAK on Windows).
        ``wait=True`` blocks until every process of the tree has ended, terminating (then killing) what
        is left after ``grace_s`` seconds; ``wait=False`` returns at once and :meth:`poll` ends the tree
        once the grace period is over. Returns the exit code, or None when still running.
        """
        if self.process is None or self.process.poll() is not None:
            return self.returncode
        self.stopRequested = True
        self._tree = descendants(self.process.pid)  # listed now: the launcher may end before them
        self._requestStop()
        if not wait:
            self._killDeadline = time.monotonic() + grace_s
            return None
        if not self._waitForTree(grace_s):
            logging.warning(f"ddm4d train (process {self.pid}) did not stop within {grace_s} s; terminating it")
            self._terminateTree()
        return self.wait()

    def kill(self):
        """End the process tree now, without waiting for a checkpoint (terminate, then kill)."""
        if self.process is None or self.process.poll() is not None:
            return self.returncode
        self.stopRequested = True
        self._terminateTree()
        return self.wait()

    def _requestStop(self):
        if self.runDirectory:
            try:
                runfolder.request_stop(self.runDirectory)
                return
            except OSError as error:
                logging.warning(f"cannot write the stop request into {self.runDirectory} ({error}); signalling")
        try:
            if os.name == "nt":
                self.process.send_signal(signal.CTRL_BREAK_EVENT)  # reaches only a child that has a console
            else:
                os.killpg(self.process.pid, signal.SIGINT)
        except OSError as error:  # it exited meanwhile
            logging.debug(f"stop: {error}")

    def _treeAlive(self):
        """The process or one of its descendants (as listed when the stop began) still runs."""
        if self.process is None:
            return False
        return self.process.poll() is None or any(_running(child) for child in self._tree)

    def _waitForTree(self, timeout):
        """Wait up to ``timeout`` seconds for the process and its descendants; True when all ended."""
        deadline = time.monotonic() + timeout
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        if self._tree:
            import psutil
            _, alive = psutil.wait_procs(self._tree, timeout=max(0.0, deadline - time.monotonic()))
            return not alive
        return True

    def _terminateTree(self):
        """Terminate the trainer and every descendant (the whole process group, and what psutil lists,
        also below a launcher that has ended), then kill what is left after a few seconds."""
        self._forced = True
        children = {child.pid: child for child in self._tree + descendants(self.process.pid)}
        endProcessTree(self.process, list(children.values()), KILL_GRACE_S, group=True)

    def wait(self, timeout=None):
        """Block until the process has ended and its output is read (console, tests, quit); exit code."""
        if self.process is None:
            return None
        returncode = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return returncode

    def _unregister(self):
        key = _normalized(self.runDirectory)
        with self._runningLock:
            if key and self._running.get(key) is self:
                del self._running[key]
