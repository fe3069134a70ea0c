"""ddm4d.files, the one place that writes safely: atomic files, result folders, the rule, the cleaning.

The rule: ddm4d never deletes or overwrites a file it did not write. Each test checks what is on disk
afterwards (which files survive, what a reader sees), not how the module does it.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ddm4d import files
from ddm4d.errors import InputError


def dead_pid() -> int:
    """The id of a process that has finished (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_result(folder: Path, names=("frames/frame_000.nii.gz", "fields/field_000.nrrd", "montage.png")) -> None:
    """A folder as `ddm4d generate` leaves it: the files, and report.json listing them."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"old {name}")
    (folder / files.MANIFEST).write_text(json.dumps({"gammas": [0, 1], **files.manifest(folder)}))


def fill_with(names):
    """A fill() for replace_folder writing `names` and the manifest listing them."""
    def fill(tmp: Path, final: Path) -> str:
        for name in names:
            files.write_text(tmp / name, f"new {name}")
        files.write_text(tmp / files.MANIFEST, json.dumps(files.manifest(tmp)))
        return "filled"
    return fill


def chmod_is_enforced(folder: Path) -> bool:
    """False as root (chmod 555 does not stop root): found out by trying to write."""
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return True
    probe.unlink()
    return False


def tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------- files

def test_atomic_write_has_the_usual_mode_and_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "deep" / "report.json"
    before = os.umask(0o027)
    try:
        files.write_text(target, "first")
    finally:
        os.umask(before)
    assert target.read_text() == "first" and stat.S_IMODE(target.stat().st_mode) == 0o640

    def failing(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, failing)
    assert os.listdir(target.parent) == ["report.json"] and target.read_text() == "first"


def test_only_our_temporary_files_are_removed(tmp_path):
    """A killed write leaves .NAME.ddm4d-XXXXXXXX.tmp[.ext]; a user's look-alike .tmp files stay."""
    ours = [tmp_path / ".model.safetensors.ddm4d-ab12cd_9.tmp", tmp_path / ".f.nii.gz.ddm4d-abcdefgh.tmp.nii.gz"]
    theirs = [tmp_path / ".notes.tmp", tmp_path / ".model.safetensors.abcdefgh.tmp", tmp_path / "data.tmp"]
    for path in ours + theirs:
        path.write_text("x")
    assert sorted(files.remove_temporary_files(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in theirs)


# ------------------------------------------------------------------------------------ the rule, checked

def test_new_empty_and_earlier_result_folders_are_accepted(tmp_path):
    assert files.check_replaceable(tmp_path / "new" / "deeper") == (tmp_path / "new" / "deeper").resolve()
    (tmp_path / "empty").mkdir()
    files.check_replaceable(tmp_path / "empty")
    write_result(tmp_path / "earlier")
    files.check_replaceable(tmp_path / "earlier")


@pytest.mark.parametrize("extra", ["important.txt", "sub/notes.txt", "frames/mine.nii.gz", "emptysub/"])
def test_a_folder_with_anything_else_is_refused_and_left_as_it_was(tmp_path, extra):
    out = tmp_path / "out"
    write_result(out)
    (out / extra).parent.mkdir(parents=True, exist_ok=True)
    if extra.endswith("/"):
        (out / extra).mkdir()
    else:
        (out / extra).write_text("precious")
    before = tree(out)
    with pytest.raises(InputError, match="did not write .*choose an empty or new folder") as err:
        files.replace_folder(out, fill_with(["a.txt"]))
    assert extra.split("/")[0] in str(err.value) and "\n" not in str(err.value)  # a foreign folder: "sub/"
    assert tree(out) == before and (out / extra.rstrip("/")).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written beside it either


def test_a_manifest_never_makes_files_outside_its_folder_ours(tmp_path):
    """report.json listing ../victim.txt (or an absolute path) does not get that file deleted."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / files.MANIFEST).write_text(json.dumps({"format": files.RESULT_FORMAT,
                                                  files.MANIFEST_FILES: ["../victim.txt", str(victim)]}))
    assert files.replace_folder(out, fill_with(["a.txt"])) == "filled"
    assert victim.read_text() == "precious" and tree(out)["a.txt"] == "new a.txt"


def test_a_linked_folder_inside_a_result_is_not_walked_into(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_result(elsewhere, names=("frames/frame_000.nii.gz",))
    out = tmp_path / "out"
    out.mkdir()
    (out / "frames").symlink_to(elsewhere / "frames")
    (out / files.MANIFEST).write_text(json.dumps({"format": files.RESULT_FORMAT,
                                                  files.MANIFEST_FILES: ["frames/frame_000.nii.gz"]}))
    with pytest.raises(InputError, match="frames/"):
        files.check_replaceable(out)
    assert (elsewhere / "frames" / "frame_000.nii.gz").read_text() == "old frames/frame_000.nii.gz"


def test_an_earlier_result_is_replaced_as_a_whole(tmp_path):
    out = tmp_path / "out"
    write_result(out)
    files.replace_folder(out, fill_with(["frames/frame_000.nii.gz", "b.txt"]))
    assert set(tree(out)) == {"frames/frame_000.nii.gz", "b.txt", files.MANIFEST}
    assert tree(out)["frames/frame_000.nii.gz"] == "new frames/frame_000.nii.gz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or set-aside folder left


def test_a_result_written_by_an_older_ddm4d_is_recognised_by_its_absolute_paths(tmp_path):
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "frame_000.nii.gz").write_text("old")
    frame = str((out / "frames" / "frame_000.nii.gz").resolve())
    (out / files.MANIFEST).write_text(json.dumps({"gammas": [0], "frames": [frame], "fields": [],
                                                  "model": "/elsewhere/model.safetensors"}))
    files.replace_folder(out, fill_with(["x.txt"]))
    assert set(tree(out)) == {"x.txt", files.MANIFEST}


@pytest.mark.parametrize("report", [{"files": ["a.txt"]}, {"format": "other", "files": ["a.txt"]}, ["a.txt"]])
def test_someone_elses_report_json_is_not_taken_for_a_result(tmp_path, report):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("theirs")
    (out / files.MANIFEST).write_text(json.dumps(report))
    with pytest.raises(InputError, match="did not write"):
        files.check_replaceable(out)
    assert (out / "a.txt").read_text() == "theirs"


def test_a_file_added_while_the_result_was_computed_is_kept_and_the_folder_put_back(tmp_path):
    out = tmp_path / "out"
    write_result(out)

    def fill(tmp, final):
        (final / "arrived.txt").write_text("meanwhile")
        return fill_with(["a.txt"])(tmp, final)

    with pytest.raises(InputError, match="arrived.txt"):
        files.replace_folder(out, fill)
    after = tree(out)
    assert after["arrived.txt"] == "meanwhile" and after["montage.png"] == "old montage.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_symbolic_link_is_followed_only_into_a_replaceable_folder(tmp_path):
    """The link is never deleted; the folder it points to is checked by the rule like any other."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "important.txt").write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    with pytest.raises(InputError, match="did not write"):
        files.replace_folder(link, fill_with(["a.txt"]))
    assert tree(data) == {"important.txt": "precious"}

    results = tmp_path / "results"
    write_result(results)
    link.unlink()
    link.symlink_to(results, target_is_directory=True)
    files.replace_folder(link, fill_with(["a.txt"]))
    assert link.is_symlink() and link.resolve() == results.resolve()
    assert set(tree(results)) == {"a.txt", files.MANIFEST}

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="does not exist"):
        files.check_replaceable(dangling)
    assert not (tmp_path / "nowhere").exists()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        files.check_replaceable(tmp_path / "taken")
    with pytest.raises(InputError, match="cannot create .*is a file"):
        files.check_writable(tmp_path / "taken" / "below")


def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if not chmod_is_enforced(locked):
            pytest.skip("running as root: chmod 555 does not stop this process from writing")
        for check in (files.check_writable, files.check_replaceable):
            with pytest.raises(InputError, match="cannot be written"):
                check(locked / "out")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, a folder no one can write")
def test_a_system_folder_is_refused_even_for_root():
    for check in (files.check_writable, files.check_replaceable):
        with pytest.raises(InputError, match="cannot be written"):
            check("/proc/ddm4d-out")


# -------------------------------------------------------------------------- leftovers of killed runs

def test_leftovers_of_a_killed_run_are_cleaned_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    pid = dead_pid()
    partial = tmp_path / f".out.ddm4d-{pid}-abcd1234.tmp"  # killed while writing: marked
    partial.mkdir()
    (partial / files.MARKER).write_text(f"{files.MARKER_TEXT} of {out}\npid {pid} host {socket.gethostname()}\n")
    (partial / "frames").mkdir()
    (partial / "frames" / "frame_000.nii.gz").write_text("half")
    set_aside = tmp_path / f".out.ddm4d-{pid}-efgh5678-old.tmp"  # killed during the swap: a whole result
    write_result(set_aside)
    look_alike = tmp_path / f".out.ddm4d-{pid}-zzzz9999.tmp"  # same name, no marker, not a result
    look_alike.mkdir()
    (look_alike / "mine.txt").write_text("precious")
    running = tmp_path / f".out.ddm4d-{os.getpid()}-abcd1234.tmp"  # a run still going (this process)
    running.mkdir()
    (running / files.MARKER).write_text(f"{files.MARKER_TEXT} of {out}\npid {os.getpid()} host x\n")
    other_name = tmp_path / f".other.ddm4d-{pid}-abcd1234.tmp"  # beside another folder
    other_name.mkdir()
    (other_name / files.MARKER).write_text(f"{files.MARKER_TEXT}\n")

    files.replace_folder(out, fill_with(["a.txt"]))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", look_alike.name, running.name, other_name.name])
    assert (look_alike / "mine.txt").read_text() == "precious"


def test_evaluate_style_publishing_keeps_other_files(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    staging = files.temporary_folder(out)
    files.write_text(staging / "report.json", "{}")
    files.publish_into(staging, out)
    assert tree(out) == {"mine.txt": "precious", "report.json": "{}"} and not staging.exists()
    fresh = tmp_path / "fresh"
    staging = files.temporary_folder(fresh)
    files.write_text(staging / "table1.md", "| |")
    files.publish_into(staging, fresh)
    assert tree(fresh) == {"table1.md": "| |"}  # the marker stays behind, nothing else is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "report"]


def test_own_result_files_may_be_rewritten_and_others_not(tmp_path):
    record, table = tmp_path / "motion.json", tmp_path / "motion.md"
    ours = lambda content: isinstance(content, dict) and "groups" in content  # noqa: E731
    files.check_own_results(record, table, ours=ours)  # new
    record.write_text(json.dumps({"groups": {}}))
    table.write_text("| |")
    files.check_own_results(record, table, ours=ours)
    record.write_text("someone else's")
    with pytest.raises(InputError, match="not written by this program"):
        files.check_own_results(record, table, ours=ours)
    record.unlink()
    with pytest.raises(InputError, match="motion.md"):
        files.check_own_results(record, table, ours=ours)


def test_result_names_with_a_dot_keep_it(tmp_path):
    """`--out motion_s0.5` and `--out motion_s0.25` are two runs: neither may land on motion_s0.json."""
    ours = lambda content: isinstance(content, dict) and "groups" in content  # noqa: E731
    for stem, value in ((tmp_path / "motion_s0.5", 0.5), (tmp_path / "motion_s0.25", 0.25)):
        files.check_results(stem, ours)
        files.write_results(stem, {"groups": value}, f"| {value} |\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["motion_s0.25.json", "motion_s0.25.md",
                                                          "motion_s0.5.json", "motion_s0.5.md"]
    assert json.loads((tmp_path / "motion_s0.5.json").read_text()) == {"groups": 0.5}
    assert files.results_paths(tmp_path / "motion_s0.5.json") == files.results_paths(tmp_path / "motion_s0.5")
    (tmp_path / "other.json").write_text("someone else's")
    with pytest.raises(InputError, match="not written by this program"):
        files.check_results(tmp_path / "other", ours)


def test_files_does_not_import_torch():
    """`ddm4d phantom` and the Slicer GUI import ddm4d.files; torch would make them slow to start."""
    code = "import sys, ddm4d.files, ddm4d.phantom; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"
