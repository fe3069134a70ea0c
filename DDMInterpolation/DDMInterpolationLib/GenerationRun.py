"""One background generation of the module, from "Generate" to the sequence in the scene (no Qt).

The widget owns at most one; everything here is plain logic, so it is tested headless. The run
belongs to the scene it was started from: closing that scene (or unloading the module) cancels it
and removes its work folder, and its results never load into a scene other than that one.
"""
import os
import shutil
import time

from .BackgroundProcess import BackgroundProcess, parseProgressLine


class GenerationRun:
    """:param logic: a DDMInterpolationLogic (its scene is the run's scene).
    :param workDirectory: a new folder for the inputs and outputs (Slicer's temporary path); removed
      when the run ends, whatever the outcome.
    :param kwargs: as :meth:`DDMInterpolationLogic.buildGenerateCommand`.
    """

    def __init__(self, logic, workDirectory, **kwargs):
        self.logic = logic
        self.scene = logic.scene
        self.workDirectory = workDirectory
        self.command = None
        self.process = None
        self.sceneClosed = False
        self.abandoned = None  # why the run was given up (scene closed, module unloaded, cancelled)
        self.seconds = {}  # "generate" (start to finished) and "load" (outputs to nodes)
        self._started = None
        self._observer = self.scene.AddObserver(self.scene.StartCloseEvent, self._onSceneClose)
        try:
            self.command = logic.buildGenerateCommand(workDirectory, **kwargs)
            self.process = BackgroundProcess(self.command.args, env=self.command.env).start()
            self._started = time.perf_counter()
        except Exception:
            self._release()
            raise

    # ------------------------------------------------------------------------------------------ progress

    def poll(self):
        """(progress, log lines) read since the last call: progress is the last (fraction, message) or None."""
        progress, lines = None, []
        for _, line in self.process.readLines():
            parsed = parseProgressLine(line)
            if parsed is not None:
                progress = parsed
            elif line.strip():
                lines.append(line)
        if self.finished and "generate" not in self.seconds and self._started is not None:
            self.seconds["generate"] = time.perf_counter() - self._started
        return progress, lines

    @property
    def finished(self):
        return self.process is None or self.process.finished

    @property
    def succeeded(self):
        return self.finished and self.abandoned is None and self.process is not None \
            and not self.process.cancelled and self.process.returncode == 0

    # --------------------------------------------------------------------------------------------- end

    def load(self, **kwargs):
        """The sequence browser node of the results, in the run's scene; the work folder is removed after.

        :raises ValueError: the run did not succeed, or its scene was closed since it started (the
          results belong to nodes that are gone).
        """
        try:
            if self.sceneClosed:
                raise ValueError("the scene this generation was started from has been closed; its results "
                                 "were discarded")
            if not self.succeeded:
                raise ValueError(f"the generation did not finish: {self.process.errorMessage()}"
                                 if self.process is not None else "the generation did not start")
            started = time.perf_counter()
            browserNode = self.logic.loadGenerateOutputs(self.command.outputDirectory, self.command.inputs, **kwargs)
            self.seconds["load"] = time.perf_counter() - started
            return browserNode
        finally:
            self._release()

    def abandon(self, reason="cancelled"):
        """Cancel the process tree (if it runs) and remove the work folder; safe to call more than once."""
        if self.abandoned is None:
            self.abandoned = reason
        if self.process is not None and not self.process.finished:
            self.process.cancel()
        self._release()

    def _onSceneClose(self, caller=None, event=None):
        self.sceneClosed = True
        self.abandon("the scene was closed")

    def _release(self):
        if self._observer is not None:
            self.scene.RemoveObserver(self._observer)
            self._observer = None
        if self.workDirectory and os.path.isdir(self.workDirectory):
            shutil.rmtree(self.workDirectory, ignore_errors=True)
