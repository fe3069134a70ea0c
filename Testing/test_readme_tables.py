"""The measured tables of the README and docs/measurements.md are the benchmarks' own output
(benchmarks/readme.py), never typed."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme  # noqa: E402

SPEED_RESULTS = {"benchmarks/results/cpu_128x128x32.md", "benchmarks/results/refine.md",
                 "benchmarks/results/authors_side_by_side.md", "benchmarks/results/end_to_end.md",
                 "benchmarks/results/train_bf16.md"}


@pytest.mark.parametrize("page", readme.PAGES, ids=lambda p: p.name)
def test_every_table_from_a_results_file_matches_that_file(page):
    text = page.read_text(encoding="utf-8")
    rendered, changed = readme.render(text)
    assert changed == [], f"run python benchmarks/readme.py: {changed}"
    assert rendered == text


def test_the_readme_copies_the_speed_tables_and_links_the_full_record():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SPEED_RESULTS - {"benchmarks/results/train_bf16.md"} <= {path for path, _ in readme.blocks(text)}
    assert "(docs/measurements.md)" in text  # the record behind the README's figures is one link away
    record = (ROOT / "docs" / "measurements.md").read_text(encoding="utf-8")
    assert SPEED_RESULTS <= {path for path, _ in readme.blocks(record)}  # none typed there either


def test_a_typed_change_is_found_and_rewritten_from_the_results_file(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# r\n\n| a | b |\n|---|---|\n| x | 1.00 |\n\nprose\n\n| c |\n|---|\n| y |\n")
    page = tmp_path / "README.md"
    page.write_text("before\n<!-- table: results.md 2 -->\n| c |\n|---|\n| typed |\n<!-- end table -->\nafter\n")
    text, changed = readme.render(page.read_text(), root=tmp_path)
    assert changed == ["results.md table 2"]
    assert text == "before\n<!-- table: results.md 2 -->\n| c |\n|---|\n| y |\n<!-- end table -->\nafter\n"
    assert readme.render(text, root=tmp_path) == (text, [])
    with pytest.raises(readme.TableError, match="has 2"):
        readme.render(page.read_text().replace("results.md 2", "results.md 3"), root=tmp_path)
    with pytest.raises(readme.TableError, match="does not exist"):
        readme.render(page.read_text().replace("results.md", "gone.md"), root=tmp_path)


def test_the_command_checks_without_writing_and_rewrites_only_when_asked(tmp_path):
    page = tmp_path / "README.md"
    shipped = (ROOT / "README.md").read_text(encoding="utf-8")
    page.write_text(shipped.replace("| 10 frames", "| 10 typed frames", 1))
    run = [sys.executable, str(ROOT / "benchmarks" / "readme.py"), "--readme", str(page)]
    done = subprocess.run(run + ["--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "authors_side_by_side.md table 2 differs" in done.stdout
    assert "10 typed frames" in page.read_text()  # --check writes nothing
    done = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "1 rewritten" in done.stdout
    assert page.read_text() == shipped


# "Motion on real scans" joins two groups in one table and names the methods for readers, so its two
# main tables are typed; each figure is held to the results file it was typed from
MOTION_NAMES = {"initial (the source)": "initial", "linear blend": "blend", "demons scaled by gamma": "demons",
                "symmetric demons": "symmetric demons", "DDM forward (the paper)": "forward",
                "DDM symmetric": "symmetric", "DDM forward + refinement": "forward+refine",
                "**DDM symmetric + refinement (default)**": "symmetric+refine",
                "DDM symmetric + refinement, linear fade (the default before)": "symmetric+refine linear fade",
                "refinement alone, forward": "refine only forward", "refinement alone, symmetric": "refine only symmetric"}
PHANTOM_COLUMNS = [("dice_mean", "{:.3f}"), ("dice_worst_frame", "{:.3f}"), ("ef_error_points", "{:.1f}"),
                   ("identical_pair_motion_mm", "{:.2f}"), ("folding_percent", "{:.3f}"), ("seconds", "{:.1f}")]


def _typed_table(text: str, first_header: str) -> dict[str, list[str]]:
    table = next(t for t in readme.tables(text) if t.startswith(first_header))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {MOTION_NAMES[row[0]]: row[1:] for row in rows}


def _cells(summary: dict, columns) -> list[str]:
    return [fmt.format(summary[key]) if key in summary else "–" for key, fmt in columns]


@pytest.mark.parametrize("results, header, groups", [
    ("motion_2d", "| method | real PSNR |", (("real", [("psnr_db", "{:.2f}"), ("nmse", "{:.4f}")]),
                                             ("phantom2d", [("psnr_db", "{:.2f}")] + PHANTOM_COLUMNS))),
    ("motion_3d", "| method | PSNR | NMSE | Dice | Dice, worst frame |",
     (("phantom3d", [("psnr_db", "{:.2f}"), ("nmse", "{:.4f}")] + PHANTOM_COLUMNS),)),
])
def test_the_typed_motion_tables_match_their_results_files(results, header, groups):
    import json

    typed = _typed_table((ROOT / "README.md").read_text(encoding="utf-8"), header)
    measured = json.loads((ROOT / "benchmarks" / "results" / f"{results}.json").read_text())["groups"]
    assert set(typed) == set(MOTION_NAMES.values())  # every method, none dropped from the typed table
    for method, cells in typed.items():
        expected = []
        for group, columns in groups:
            summary = measured[group][method]["summary"]
            expected += _cells(summary, columns)
        assert cells == expected, f"{results}: {method}"
