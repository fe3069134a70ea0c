"""A command run in the background whose output is read without blocking (no Qt needed).

Two reader threads put the child's stdout and stderr lines into a queue; the owner drains it with
:meth:`BackgroundProcess.readLines` from wherever it likes (the widget: a ``qt.QTimer``), so the GUI
never waits on the child. :meth:`cancel` ends the whole process tree.
"""
import logging
import os
import queue
import re
import signal
import subprocess
import threading

from ddm4d.runfolder import json_object  # torch-free

STDOUT = "stdout"
STDERR = "stderr"


class BackgroundProcess:
    """:param args: the command line (list); :param env: full environment (None: inherit)."""

    def __init__(self, args, env=None, cwd=None):
        self.args = list(args)
        self.env = env
        self.cwd = cwd
        self.process = None
        self.cancelled = False
        self.stderrTail = []
        self._lines = queue.Queue()
        self._readers = []

    def start(self):
        self.process = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
            bufsize=1, **hiddenProcessOptions(newSession=False))
        for stream, name in ((self.process.stdout, STDOUT), (self.process.stderr, STDERR)):
            reader = threading.Thread(target=self._read, args=(stream, name), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, stream, name):
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    def readLines(self):
        """Every line read since the last call, as (stream name, text); never blocks."""
        lines = []
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if name == STDERR:
                self.stderrTail = (self.stderrTail + [line])[-20:]
            lines.append((name, line))

    @property
    def finished(self):
        """True once the process has exited and all its output has been read by the threads."""
        return (self.process is not None and self.process.poll() is not None
                and not any(reader.is_alive() for reader in self._readers))

    @property
    def returncode(self):
        return None if self.process is None else self.process.poll()

    def errorMessage(self):
        """The child's last non-empty stderr line (the CLI's one-line error), or a generic message."""
        for line in reversed(self.stderrTail):
            if line.strip():
                return line.strip()
        return f"the process ended with exit code {self.returncode}"

    def cancel(self, timeout=5.0):
        """End the process and every descendant (the worker behind a launcher such as PythonSlicer)."""
        self.cancelled = True
        if self.process is None or self.process.poll() is not None:
            return
        endProcessTree(self.process, descendants(self.process.pid), timeout)

    def wait(self, timeout=None):
        """Block until the process ends (console and tests); returns the exit code."""
        returncode = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return returncode


def hiddenProcessOptions(newSession=True):
    """``subprocess.Popen`` keywords for a child of the Slicer application.

    Windows: no console window (a window per run, whose closing would kill the job), as
    ``slicer.util.launchConsoleProcess`` does, in its own process group. POSIX, with ``newSession``:
    its own session and process group, so that the whole tree can be signalled.
    """
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = subprocess.SW_HIDE
        return {"startupinfo": info,
                "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True} if newSession else {}


def descendants(pid):
    """The processes below ``pid`` (psutil objects; empty without psutil or once it has ended).

    Inside Slicer ``sys.executable`` is the PythonSlicer launcher, which runs the real Python as its
    child and forwards no signals: the work happens one level down.
    """
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except ImportError:
        logging.debug("psutil is not installed: only the direct child process can be ended")
    except Exception as error:  # it ended meanwhile
        logging.debug(f"listing the children of {pid}: {error}")
    return []


def endProcessTree(process, children, timeout=5.0, group=False):
    """Terminate ``process`` (a ``subprocess.Popen``) and ``children``, then kill what is left.

    ``group`` (POSIX, a child started in its own session): signal its whole process group too, which
    reaches descendants that psutil could not list. The direct child is ended through subprocess, so
    its exit code stays readable (psutil would reap it).
    """
    for child in children:
        try:
            child.terminate()
        except Exception:  # ended meanwhile
            pass
    if group and os.name != "nt":
        _signalGroup(process, signal.SIGTERM)
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        if group and os.name != "nt":
            _signalGroup(process, signal.SIGKILL)
        process.kill()
        process.wait(timeout)
    if children:
        import psutil
        _, alive = psutil.wait_procs(children, timeout=timeout)
        for child in alive:
            try:
                child.kill()
            except Exception:
                pass


def _signalGroup(process, signalNumber):
    try:
        os.killpg(process.pid, signalNumber)  # the child leads its own group (start_new_session)
    except OSError as error:
        logging.debug(f"signalling process group {process.pid}: {error}")


_PERCENT_LINE = re.compile(r"^\[\s*(\d+(?:\.\d*)?)%\]\s*(.*)$")


def processEnvironment():
    """The current environment with the folder holding ``ddm4d`` first on PYTHONPATH, for a child Python.

    Inside Slicer, ddm4d is installed next to the modules (qt-scripted-modules, not site-packages),
    so a child PythonSlicer finds it only this way. Output is unbuffered UTF-8, so lines arrive as
    they are printed.
    """
    import ddm4d
    packageParent = os.path.dirname(os.path.dirname(os.path.abspath(ddm4d.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([packageParent] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def parseProgressLine(line):
    """(fraction, message) from one progress line of a ``ddm4d`` command, else None.

    Accepts ``ddm4d generate``'s ``[ 42.0%] fitting 10/50: loss 0.1234`` (on stderr) and JSON events
    such as ``{"event": "progress", "fraction": 0.5, "message": "fitting"}``; anything else (plain log
    text, other events) gives None.
    """
    line = line.strip()
    match = _PERCENT_LINE.match(line)
    if match:
        return max(0.0, min(1.0, float(match.group(1)) / 100.0)), match.group(2)
    event = json_object(line)
    if event is None:
        return None
    fraction = event.get("fraction", event.get("progress"))
    if not isinstance(fraction, (int, float)):
        return None
    return max(0.0, min(1.0, float(fraction))), str(event.get("message", event.get("event", "")))
