"""Python packages ddm4d needs inside Slicer: check at first use, install only after asking.

torch comes through the PyTorch extension's ``PyTorchUtils`` logic (it picks the build that fits the
user's GPU driver); the small pure-Python packages through ``slicer.util.pip_install``. Nothing here
runs at import time, and nothing opens a dialog by itself: the caller passes ``confirm`` (the widget
passes ``slicer.util.confirmOkCancelDisplay``); without it, missing packages raise :class:`InstallError`
with the instructions, which is what a console script wants.
"""
import importlib.metadata
import importlib.util
import logging
import re

from .Constants import PIP_REQUIREMENTS, TORCH_REQUIREMENT


class InstallError(RuntimeError):
    """A required package is missing and was not installed; the message says what to do."""

    def __init__(self, message, restartRequired=False):
        super().__init__(message)
        self.restartRequired = restartRequired


def _installed(importName):
    return importlib.util.find_spec(importName) is not None


def _versionTuple(version):
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def torchVersionSatisfied(version, requirement=TORCH_REQUIREMENT):
    """True when a torch version string (e.g. '2.13.0+cu126') meets a '>=X.Y' requirement."""
    return _versionTuple(version) >= _versionTuple(requirement)


def missingPipPackages():
    """pip requirement strings of the small packages that are not importable."""
    return [requirement for importName, requirement in PIP_REQUIREMENTS.items() if not _installed(importName)]


def torchStatus():
    """(installed, version or None, satisfies TORCH_REQUIREMENT)."""
    if not _installed("torch"):
        return False, None, False
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False, None, False
    return True, version, torchVersionSatisfied(version)


def requirementsMet():
    installed, _, satisfied = torchStatus()
    return installed and satisfied and not missingPipPackages()


def _torchLogic():
    try:
        import PyTorchUtils  # the PyTorch extension's module (Qt-based; imported only here, on demand)
    except ImportError:
        raise InstallError(
            "DDMInterpolation needs PyTorch, which Slicer installs through the 'PyTorch' extension. "
            "Install 'PyTorch' from the Extensions Manager, restart Slicer, then try again.") from None
    return PyTorchUtils.PyTorchUtilsLogic()


def installQuestion(torchMissing, missing):
    """The one question asked before anything is installed: everything that will be, in order."""
    steps = []
    if torchMissing:
        steps.append(f"PyTorch (torch{TORCH_REQUIREMENT}) through the PyTorch extension, the build that fits "
                     "this computer's GPU driver (a large download, up to a few GB)")
    if missing:
        steps.append(f"then the Python packages {' '.join(missing)} with pip (a few megabytes)")
    return ("DDMInterpolation needs software that is not installed yet:\n\n- " + "\n- ".join(steps)
            + "\n\nInstall it now? Slicer stays usable; it may need a restart afterwards.")


def ensureRequirements(confirm=None, pipInstall=None, torchLogic=None):
    """Make sure torch and the pip packages of ddm4d are importable, installing them after asking once.

    :param confirm: ``confirm(message) -> bool``, asked once, listing everything that will be installed
      (as SlicerTotalSegmentator does). ``None`` means non-interactive: nothing is installed and a
      missing package raises :class:`InstallError`.
    :param pipInstall: ``pipInstall(requirements: str)``; default ``slicer.util.pip_install``.
    :param torchLogic: the PyTorch extension's ``PyTorchUtilsLogic`` (default: imported when needed).
    :raises InstallError: a package is missing and was not installed, or torch is too old.
    """
    installed, version, satisfied = torchStatus()
    if installed and not satisfied:
        raise InstallError(
            f"PyTorch {version} is installed but DDMInterpolation needs torch{TORCH_REQUIREMENT}. In the PyTorch "
            "Utils module: uninstall PyTorch, restart Slicer, and install it again.", restartRequired=True)
    missing = missingPipPackages()
    if installed and not missing:
        return
    names = " ".join(missing)
    if confirm is None:
        if not installed:
            raise InstallError(
                f"PyTorch (torch{TORCH_REQUIREMENT}) is not installed. Open the DDMInterpolation module and press "
                "Generate to be offered the installation, or install it in the PyTorch Utils module.")
        raise InstallError(f"Required Python packages are missing: {names}. "
                           f"Install them with: slicer.util.pip_install('{names}')")
    if not installed:
        torchLogic = torchLogic or _torchLogic()  # before asking: without the extension there is nothing to ask
    if not confirm(installQuestion(not installed, missing)):
        raise InstallError("Nothing was installed. DDMInterpolation needs "
                           + " and ".join(([f"torch{TORCH_REQUIREMENT}"] if not installed else []) + missing) + ".")
    if not installed and not torchLogic.torchInstalled():
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise InstallError(f"PyTorch{TORCH_REQUIREMENT} was not installed; see the Python console. Install it "
                               "from the PyTorch Utils module (Utilities category), then try again.")
    if missing:
        if pipInstall is None:
            import slicer.util
            pipInstall = slicer.util.pip_install
        logging.info(f"Installing {names}")
        pipInstall(names)
        still = missingPipPackages()
        if still:
            raise InstallError(f"Installing {' '.join(still)} did not succeed; see the Python console for pip's output.",
                               restartRequired=True)
