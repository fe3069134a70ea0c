"""Stands in for Slicer's PythonSlicer in tests: like that CTK launcher, it runs the real Python as its
child, forwards no signal to it, and exits with the child's exit code.

    python pythonslicer_like.py ARGS...    (runs: python ARGS...)
"""
import subprocess
import sys

if __name__ == "__main__":
    child = subprocess.Popen([sys.executable, *sys.argv[1:]])
    sys.exit(child.wait())
