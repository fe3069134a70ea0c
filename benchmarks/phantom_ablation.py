"""Collect the reports of benchmarks/phantom_ablation.sh into results/phantom_ablation.{json,md}.

    python benchmarks/phantom_ablation.py WORK_DIR
"""
import json
import sys
from pathlib import Path

from ddm4d import files

ROWS = [  # (label, report folder, method key in that report, run folder)
    ("Initial (the source)", "report_all", "initial", None),
    ("Linear intensity blend", "report_all", "linear", None),
    ("DDM, the paper's loss", "report_ddm_paper_loss", "ddm", "ddm_paper_loss"),
    ("DDM, loss on phi(c) - phi(0), no EMA", "report_ddm", "ddm", "ddm"),
    ("DDM, same + EMA 0.999 (the defaults)", "report_ddm_ema", "ddm", "ddm_ema"),
    ("VM", "report_all", "vm", "vm"),
    ("VM-diff", "report_all", "vmdiff", "vmdiff"),
]
METRICS = [("psnr_db", "PSNR (dB)", 2), ("nmse", "NMSE", 4), ("dice_lv_blood_pool", "Dice LV", 3),
           ("dice_lv_myocardium", "Dice myo", 3), ("dice_rv", "Dice RV", 3), ("dice_total", "Dice total", 3),
           ("ef_abs_error", "|EF error|", 3), ("folding_percent", "folding (%)", 3)]


def training_seconds(run_dir: Path) -> float | None:
    done = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if '"done"' in line]
    return done[-1].get("elapsed_s") if done else None


def main(work: Path) -> None:
    rows = []
    for label, report, key, run in ROWS:
        aggregate = json.loads((work / report / "report.json").read_text())["aggregate"].get(key, {})
        row = {"method": label, **{m: aggregate.get(m, {}).get("mean") for m, _, _ in METRICS}}
        if run:
            row["iterations"] = json.loads((work / run / "config.json").read_text())["run"]["total_iterations"]
            row["training_s"] = training_seconds(work / run)
        rows.append(row)
    out = Path(__file__).resolve().parent / "results"
    fmt = lambda v, d: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| method | " + " | ".join(h for _, h, _ in METRICS) + " | iterations | training (s) |",
             "|---" * (len(METRICS) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(fmt(r[m], d) for m, _, d in METRICS)
                     + f" | {r.get('iterations', '–')} | {fmt(r.get('training_s'), 0)} |")
    files.write_results(out / "phantom_ablation", rows, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
