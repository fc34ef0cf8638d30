"""experiments/summary.py: the README's results table is generated from the grids' results.csv files."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def summary():
    sys.path.insert(0, str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location("summary", REPO / "experiments" / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_matches_the_results(summary):
    text = (REPO / "README.md").read_text()
    block = text.split(summary.BEGIN)[1].split(summary.END)[0].strip().splitlines()
    assert block == summary.table(), "README.md's table is stale: python experiments/summary.py --write README.md"


CONFIG = """
model: tiny
tasks: [sst2, cola]
methods: [fp32, uniform, hessian, rule, measured, fisher_t, fisher_w, fisher_ws, nasq, nasq_ge4]
budgets:
  avg2: {avg_bits: 2, space: aqbert_128g_w1234, uniform: {bits: 2}}
  mb8: {budget_mb: 8, convention: artifact, space: whole_model_w1234, uniform: {bits: 2}}
  avg3: {avg_bits: 3, space: aqbert_128g_w234, uniform: {bits: 3}}
  avg4: {avg_bits: 4, space: aqbert_128g_w3456, uniform: {bits: 4}}
"""


def _write(tmp_path: Path, rows: list[tuple]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "g.yaml").write_text(CONFIG)
    (tmp_path / "res").mkdir()
    cols = ["task", "method", "budget", "seed", "status", "metric_name", "metric", "within_budget", "artifact_mb"]
    with (tmp_path / "res" / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return tmp_path


def test_rows_statistics_and_verdicts(summary, tmp_path, monkeypatch):
    monkeypatch.setattr(summary, "DEFAULT", "measured")  # the margins below are measured's, whatever the default
    acc, mcc = "accuracy", "matthews"
    rows = [("sst2", "fp32", "fp32", 0, "done", acc, 0.9, "", "")]
    rows += [("sst2", "uniform", "avg2", s, "done", acc, v, "yes", "") for s, v in enumerate((0.85, 0.86, 0.87))]
    rows += [("sst2", "hessian", "avg2", s, "done", acc, v, "yes", "") for s, v in enumerate((0.86, 0.87, 0.88))]
    rows += [("sst2", "measured", "avg2", s, "done", acc, v, "yes", "") for s, v in enumerate((0.88, 0.885, 0.89))]
    rows += [("sst2", "nasq", "avg2", s, "done", acc, v, "yes", "") for s, v in enumerate((0.80, 0.81))]
    rows += [("sst2", "nasq_ge4", "avg2", 0, "done", acc, 0.95, "no", "")]  # over the budget: never best
    # cola: measured level with the rule (inside the spread); uniform over; avg3 has no measured cell: no row
    rows += [("cola", "fp32", "fp32", 0, "done", mcc, 0.3, "", "")]
    rows += [("cola", "uniform", "mb8", s, "done", mcc, v, "yes", "7.11") for s, v in enumerate((0.1, 0.2))]
    rows += [("cola", "rule", "mb8", s, "done", mcc, v, "yes", "") for s, v in enumerate((0.2, 0.3))]
    rows += [("cola", "measured", "mb8", s, "done", mcc, v, "yes", "") for s, v in enumerate((0.22, 0.3))]
    rows += [("cola", "measured", "avg2", 0, "not run", mcc, "", "", "")]
    rows += [("cola", "uniform", "avg3", 0, "done", mcc, 0.2, "yes", "")]
    # cola avg2: only the Fisher allocator ran: a row, its own column, no margin for the measured default
    rows += [("cola", "fisher_t", "avg2", s, "done", mcc, v, "yes", "") for s, v in enumerate((0.25, 0.27))]
    d = _write(tmp_path, rows)
    lines = summary.table(d, (("g.yaml", "res", ""),))
    assert len(lines) == 15 and lines[5] == "" and lines[7] == "", lines
    # pooled: sst2 avg2 against Hessian (ahead in mean, 3 of 3 seeds); cola mb8 against the rule (1 of 2)
    assert "higher mean at 2 of 2 rows (sign test p = 0.25), ahead on 4 of 5 paired seeds (p = 0.19); " \
        "at avg <= 2.5 bits: higher mean at 1 of 1 rows (sign test p = 0.5), ahead on 3 of 3 paired seeds " \
        "(p = 0.12)" in lines[6], lines[6]
    # targets: the same two margins, sorted by verdict; SST-2 avg 2 against its teacher (0.90 - 0.885 <= 0.015)
    assert lines[8].startswith("Targets of issue 16 (generated): measured (nasq's default)"), lines[8]
    assert lines[9:14] == ["- beyond the spread, higher mean (1): SST-2 avg 2, {1,2,3,4} (+1.50 vs Hessian)",
                           ("- higher or equal mean, inside the spread (1): CoLA whole artifact <= 8 MB, encoder "
                           "{1,2,3,4}, vocabulary {2,3,4} (+0.010 vs hand rule)"),
                           "- lower mean, inside the spread (0): none", "- lower mean, beyond the spread (0): none",
                           "- one seed on a side, no claim (0): none"], lines[9:14]
    assert lines[14] == "- within reach of the fp32 teacher: SST-2 avg 2, {1,2,3,4}: 1.50 below it (target: at " \
        "most 1.50), met", lines[14]
    lines = lines[:5]
    assert "**measured** (nasq's default) | Fisher per tensor |" in lines[0]
    sst2, cola_avg2, cola = lines[2:]
    assert cola_avg2.split(" | ")[6:9] == ["not run", "**0.260 ± 0.014 (2)**", "not run"], cola_avg2
    assert sst2.split(" | ")[:5] == ["| SST-2", "avg 2, {1,2,3,4}", "90.00", "86.00 ± 1.00 (3), 2-bit",
                                     "87.00 ± 1.00 (3)"]
    assert "**88.50 ± 0.50 (3)**" in sst2 and "+1.50 vs Hessian (beyond the spread; ahead on 3 of 3 seeds)" in sst2
    assert "80.50 ± 0.71 (2), `nasq`" in sst2 and "95.00" not in sst2 and "| not run |" in sst2
    assert cola.split(" | ")[1] == "whole artifact <= 8 MB, encoder {1,2,3,4}, vocabulary {2,3,4}"
    assert "0.150 ± 0.071 (2), 2-bit (7.11 MB)" in cola and "0.250 ± 0.071 (2), hand rule" in cola
    assert "**0.260 ± 0.057 (2)**" in cola and "+0.010 vs hand rule (inside the spread; ahead on 1 of 2 seeds)" in cola


def test_the_margin_follows_the_pipeline_default(summary, tmp_path, monkeypatch):
    """With Fisher as nasq's default, the margin is the Fisher plans' over the best other method, measured included."""
    rows = [("sst2", m, "avg2", s, "done", "accuracy", v + 0.01 * s, "yes", "")
            for m, v in (("uniform", 0.85), ("measured", 0.87), ("fisher_t", 0.88)) for s in (0, 1)]
    d = _write(tmp_path, rows)
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    line = summary.table(d, (("g.yaml", "res", ""),))[2]
    assert "+1.00 vs measured (beyond the spread; ahead on 2 of 2 seeds)" in line, line
    alone = [("cola", "fisher_t", "avg3", 0, "done", "matthews", 0.2, "yes", "")]
    line = summary.table(_write(tmp_path / "alone", alone), (("g.yaml", "res", ""),))[2]
    assert "| **0.200 (1)** | not run | no other method finished |" in line, line


def test_the_default_column_is_the_pipelines_default_allocator(summary):
    from nasq.pipeline import ALLOCATORS

    assert summary.DEFAULT == summary.PIPELINE_METHOD[ALLOCATORS[0]] and summary.DEFAULT in summary.SENSITIVITY


def _two_grids(summary, d: Path, old: str, new: str) -> list[str]:
    """The table of ``d``'s grid and a second one ("2x QAT") whose results.csv is the first's with ``old`` -> ``new``."""
    (d / "res2").mkdir()
    (d / "res2" / "results.csv").write_text((d / "res" / "results.csv").read_text().replace(old, new))
    return summary.table(d, (("g.yaml", "res", ""), ("g.yaml", "res2", ", 2x QAT")))


def test_a_second_grid_row_follows_the_first(summary, tmp_path, monkeypatch):
    monkeypatch.setattr(summary, "DEFAULT", "measured")
    rows = [("sst2", m, "avg2", s, "done", "accuracy", v, "yes", "")
            for m, v in (("uniform", 0.85), ("measured", 0.87)) for s in (0, 1)]
    lines = _two_grids(summary, _write(tmp_path, rows), ",0.87,", ",0.88,")
    assert [ln.split(" | ")[1] for ln in lines[2:4]] == ["avg 2, {1,2,3,4}", "avg 2, {1,2,3,4}, 2x QAT"]
    assert "+2.00 vs uniform (beyond the spread; ahead on 2 of 2 seeds)" in lines[2] \
        and "+3.00 vs uniform (beyond the spread; ahead on 2 of 2 seeds)" in lines[3]


def test_sign_test(summary):
    assert summary.sign_test(3, 3) == 1 / 8 and summary.sign_test(0, 5) == 1.0
    assert summary.sign_test(9, 10) == pytest.approx(11 / 1024)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        summary.sign_test(4, 3)


def test_pooled_paragraph_skips_nasqs_other_allocators_and_over_budget_baselines(summary, tmp_path, monkeypatch):
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    rows = [("sst2", "fisher_t", "avg2", s, "done", "accuracy", 0.88, "yes", "") for s in (0, 1)]
    rows += [("sst2", "measured", "avg2", s, "done", "accuracy", 0.90, "yes", "") for s in (0, 1)]  # not a baseline
    rows += [("sst2", "uniform", "avg2", s, "done", "accuracy", 0.95, "no", "") for s in (0, 1)]  # over the budget
    cola = [("cola", "fisher_t", "avg3", s, "done", "matthews", 0.2, "yes", "") for s in (0, 1)]
    cola += [("cola", "uniform", "avg3", s, "done", "matthews", 0.1 + 0.2 * s, "yes", "") for s in (0, 1)]
    lines = summary.table(_write(tmp_path / "a", rows + cola), (("g.yaml", "res", ""),))
    pooled = next(ln for ln in lines if ln.startswith("Pooled"))
    assert pooled.startswith("Pooled over the rows (generated): Fisher per tensor (nasq's default)"), pooled
    assert "higher mean at 0 of 1 rows (sign test p = 1), ahead on 1 of 2 paired seeds (p = 0.75); " \
        "at avg <= 2.5 bits: no rows." in pooled, pooled
    # no row with a baseline: no pooled paragraph and no targets; the default against measured still listed
    lines = summary.table(_write(tmp_path / "b", rows), (("g.yaml", "res", ""),))
    assert not any(ln.startswith(("Pooled", "Targets")) for ln in lines), lines
    assert lines[-7:] == ["", ("Fisher per tensor (nasq's default) against nasq's other allocator, measured, at the 1 "
                              "rows both ran (generated):"),
                          "- beyond the spread, higher mean (0): none",
                          "- higher or equal mean, inside the spread (0): none",
                          "- lower mean, inside the spread (0): none",
                          "- lower mean, beyond the spread (1): SST-2 avg 2, {1,2,3,4} (-2.00 vs measured)",
                          "- one seed on a side, no claim (0): none"], lines


def test_the_alternative_has_a_column_and_its_own_verdicts(summary, tmp_path, monkeypatch):
    """nasq's other Fisher granularity (summary.ALTERNATIVE): a column of its own, never a baseline of the default's
    margin, its own list against each row's best baseline, and the default against it head to head."""
    assert {summary.DEFAULT, summary.ALTERNATIVE} == {"fisher_t", "fisher_w"}
    monkeypatch.setattr(summary, "DEFAULT", "fisher_w")
    monkeypatch.setattr(summary, "ALTERNATIVE", "fisher_t")
    monkeypatch.setattr(summary, "ALTERNATIVE_ROLE", "the default until 2026-12-05")
    rows = [("cola", m, "avg2", s, "done", "matthews", v + 0.01 * s, "yes", "")
            for m, v in (("uniform", 0.20), ("fisher_t", 0.22), ("fisher_w", 0.26)) for s in (0, 1)]
    lines = summary.table(_write(tmp_path, rows), (("g.yaml", "res", ""),))
    assert "| Fisher per tensor | **Fisher per weight** (nasq's default) | Fisher per weight - best other |" \
        in lines[0], lines[0]
    assert "| 0.225 ± 0.007 (2) | **0.265 ± 0.007 (2)** | +0.060 vs uniform (beyond the spread" in lines[2], lines[2]
    assert lines[-14:-7] == ["", ("Fisher per tensor, the default until 2026-12-05, against each row's best "
                                  "baseline by mean (as the targets above), at the 1 rows it ran (generated):"),
                             "- beyond the spread, higher mean (1): CoLA avg 2, {1,2,3,4} (+0.020 vs uniform)",
                             "- higher or equal mean, inside the spread (0): none",
                             "- lower mean, inside the spread (0): none",
                             "- lower mean, beyond the spread (0): none",
                             "- one seed on a side, no claim (0): none"], lines
    assert lines[-7:] == ["", ("Fisher per weight (nasq's default) against Fisher per tensor (the default until "
                              "2026-12-05), head to head, at the 1 rows both ran (generated):"),
                          "- beyond the spread, higher mean (1): CoLA avg 2, {1,2,3,4} (+0.040 vs Fisher per tensor)",
                          "- higher or equal mean, inside the spread (0): none",
                          "- lower mean, inside the spread (0): none",
                          "- lower mean, beyond the spread (0): none",
                          "- one seed on a side, no claim (0): none"], lines
    # a row without the alternative has no head-to-head entry
    lines = summary.table(_write(tmp_path / "b", [r for r in rows if r[1] != "fisher_t"]), (("g.yaml", "res", ""),))
    assert not any("head to head" in ln for ln in lines), lines
    # the other way round: per tensor the default, per weight the alternative
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    monkeypatch.setattr(summary, "ALTERNATIVE", "fisher_w")
    lines = summary.table(_write(tmp_path / "c", rows), (("g.yaml", "res", ""),))
    assert "| **Fisher per tensor** (nasq's default) | Fisher per weight | Fisher per tensor - best other |" in lines[0]
    assert "- lower mean, beyond the spread (1): CoLA avg 2, {1,2,3,4} (-0.040 vs Fisher per weight)" in lines


def test_replace_block_needs_one_block(summary):
    text = f"a\n{summary.BEGIN}\nold\n{summary.END}\nb\n"
    assert summary.replace_block(text, ["new"]) == f"a\n{summary.BEGIN}\nnew\n{summary.END}\nb\n"
    with pytest.raises(SystemExit, match="exactly one summary block"):
        summary.replace_block("no block here", ["x"])


def test_targets_sort_rows_by_verdict_and_check_the_teacher_gap(summary, tmp_path, monkeypatch):
    """Issue 16's targets paragraph: each row's margin over its best baseline lands in one verdict; a row with one
    seed on a side makes no claim; SST-2 avg 2 and 4 and the 8-MB artifact are checked against the teacher (1.5, 0.5
    and 1.5 points), also at a row where no baseline ran (avg 4 here)."""
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    acc = "accuracy"
    rows = [("sst2", "fp32", "fp32", 0, "done", acc, 0.90, "", "")]
    # avg2: fisher_t below the Hessian beyond the spread, 2.5 points below the teacher (target missed)
    rows += [("sst2", "fisher_t", "avg2", s, "done", acc, v, "yes", "") for s, v in enumerate((0.875, 0.875))]
    rows += [("sst2", "hessian", "avg2", s, "done", acc, v, "yes", "") for s, v in enumerate((0.89, 0.89))]
    # avg3: one uniform seed only: no claim
    rows += [("sst2", "fisher_t", "avg3", s, "done", acc, v, "yes", "") for s, v in enumerate((0.88, 0.89))]
    rows += [("sst2", "uniform", "avg3", 0, "done", acc, 0.80, "yes", "")]
    # mb8 (the whole artifact; DESIGN.md: within 1.5 points of the teacher): 1.4 below it, level with uniform
    rows += [("sst2", "fisher_t", "mb8", s, "done", acc, v, "yes", "8.0") for s, v in enumerate((0.885, 0.887))]
    rows += [("sst2", "uniform", "mb8", s, "done", acc, v, "yes", "7.1") for s, v in enumerate((0.88, 0.89))]
    # avg4: only the default ran (no baseline, no verdict), 0.2 below the teacher: still checked (target 0.5)
    rows += [("sst2", "fisher_t", "avg4", s, "done", acc, v, "yes", "") for s, v in enumerate((0.897, 0.899))]
    lines = summary.table(_write(tmp_path, rows), (("g.yaml", "res", ""),))
    body = lines[lines.index(next(ln for ln in lines if ln.startswith("Targets"))) + 1:]
    assert body == ["- beyond the spread, higher mean (0): none",
                    ("- higher or equal mean, inside the spread (1): SST-2 whole artifact <= 8 MB, encoder {1,2,3,4}, "
                     "vocabulary {2,3,4} (+0.10 vs uniform)"),
                    "- lower mean, inside the spread (0): none",
                    "- lower mean, beyond the spread (1): SST-2 avg 2, {1,2,3,4} (-1.50 vs Hessian)",
                    "- one seed on a side, no claim (1): SST-2 avg 3, {2,3,4} (+8.50 vs uniform)",
                    ("- within reach of the fp32 teacher: SST-2 avg 2, {1,2,3,4}: 2.50 below it (target: at most "
                    "1.50), missed; SST-2 whole artifact <= 8 MB, encoder {1,2,3,4}, vocabulary {2,3,4}: 1.40 below "
                    "it (target: at most 1.50), met; SST-2 avg 4, {3,4,5,6}: 0.20 below it (target: at most 0.50), "
                    "met"),
                    ("- what a mean beyond the spread would need where that target is missed (avg <= 2.5 bits; the "
                     "best baseline's mean plus the larger std as they stand): SST-2 avg 2, {1,2,3,4}: above 89.00 "
                     "(1.00 below the teacher's 90.00)")], body
    assert summary.teacher_gap_allowed("sst2", {"avg_bits": 2}) == 0.015
    assert summary.teacher_gap_allowed("sst2", {"budget_mb": 8, "convention": "artifact"}) == 0.015
    assert summary.teacher_gap_allowed("sst2", {"budget_mb": 8}) is None  # 8 MB of encoder: not the target
    assert summary.teacher_gap_allowed("cola", {"avg_bits": 2}) is None


def test_win_bar_is_the_best_baselines_mean_plus_the_larger_std_where_the_target_is_missed(summary, monkeypatch):
    """The bar a missed beyond-the-spread target sets: the best baseline's mean plus the larger std (the default's
    own spread counts), only at avg <= 2.5 bits, only with a verdict, never where the target is met."""
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    ranked = {"fisher_t": (0.27, 0.03, 3), "fisher": (0.26, 0.01, 3)}
    level = summary.Margin("fisher", 0.01, False, (2, 3))
    assert summary.win_bar(ranked, level, {"avg_bits": 2}, 0.297) == pytest.approx((0.29, 0.297))
    assert summary.win_bar(ranked, level, {"avg_bits": 3}, 0.297) is None  # no beyond-the-spread target above 2.5
    assert summary.win_bar(ranked, level, {"budget_mb": 8}, 0.297) is None
    assert summary.win_bar(ranked, level._replace(beyond=None), {"avg_bits": 2}, 0.297) is None  # no verdict
    met = summary.Margin("fisher", 0.05, True, (3, 3))
    assert summary.win_bar(ranked, met, {"avg_bits": 2}, 0.297) is None
    behind = summary.Margin("fisher", -0.05, True, (0, 3))  # lower beyond the spread: missed too
    assert summary.win_bar(ranked, behind, {"avg_bits": 1.5}, None) == pytest.approx((0.29, None))


def test_the_lists_follow_the_tables_row_order(summary, tmp_path, monkeypatch):
    """A later grid's avg-2 row lists before an earlier grid's avg-3 row, as in the table (configs' budget order)."""
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    avg3 = [("sst2", m, "avg3", s, "done", "accuracy", v + 0.001 * s, "yes", "")
            for m, v in (("uniform", 0.85), ("fisher_t", 0.87)) for s in (0, 1)]
    lines = _two_grids(summary, _write(tmp_path, avg3), ",avg3,", ",avg2,")
    assert [ln.split(" | ")[1] for ln in lines[2:4]] == ["avg 2, {1,2,3,4}, 2x QAT", "avg 3, {2,3,4}"]
    assert "- beyond the spread, higher mean (2): SST-2 avg 2, {1,2,3,4}, 2x QAT (+2.00 vs uniform); SST-2 avg 3, " \
        "{2,3,4} (+2.00 vs uniform)" in lines, lines


def test_a_rows_verdict_names_the_baselines_it_lacks(summary, tmp_path, monkeypatch):
    """A baseline that finished at the same (task, budget) in another grid but not in a row is named on that row's
    verdict ("not run in this row"), both ways; a row that ran every such baseline names none."""
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    rows = [("sst2", m, "avg2", s, "done", "accuracy", v + 0.001 * s, "yes", "")
            for m, v in (("uniform", 0.85), ("rule", 0.86), ("fisher_t", 0.88)) for s in (0, 1)]
    lines = _two_grids(summary, _write(tmp_path, rows), ",rule,", ",hessian,")
    verdict = next(ln for ln in lines if ln.startswith("- beyond the spread, higher mean"))
    assert verdict == ("- beyond the spread, higher mean (2): SST-2 avg 2, {1,2,3,4} (+2.00 vs hand rule; not run in "
                       "this row: Hessian); SST-2 avg 2, {1,2,3,4}, 2x QAT (+2.00 vs Hessian; not run in this row: "
                       "hand rule)"), verdict
    one = summary.table(tmp_path, (("g.yaml", "res", ""),))
    assert "- beyond the spread, higher mean (1): SST-2 avg 2, {1,2,3,4} (+2.00 vs hand rule)" in one, one


def test_budget_labels(summary):
    assert summary.budget_label({"avg_bits": 2.5, "space": "aqbert_128g_w234"}) == "avg 2.5, {2,3,4}"
    assert summary.budget_label({"budget_mb": 8, "convention": "artifact", "space": "whole_model_w1234"}) == \
        "whole artifact <= 8 MB, encoder {1,2,3,4}, vocabulary {2,3,4}"
    assert summary.budget_label({"latency_ms": 42, "latency_table": "experiments/results/lat.json",
                                 "space": "aqbert_128g"}) == "latency <= 42 ms on lat.json, {0,2,4,8}"


def test_a_candidate_is_compared_head_to_head_with_both_granularities(summary, tmp_path, monkeypatch):
    """A candidate for the default (summary.CANDIDATES) gets no column and is no baseline: a list against the best
    baseline at the rows it ran, lists head to head with the default and with the alternative at the rows both
    ran, nothing where it did not run."""
    monkeypatch.setattr(summary, "DEFAULT", "fisher_t")
    monkeypatch.setattr(summary, "ALTERNATIVE", "fisher_w")
    monkeypatch.setattr(summary, "ALTERNATIVE_ROLE", "the other granularity")
    rows = [("cola", m, "avg2", s, "done", "matthews", v + 0.01 * s, "yes", "")
            for m, v in (("uniform", 0.20), ("fisher_t", 0.22), ("fisher_w", 0.26), ("fisher_ws", 0.25))
            for s in (0, 1)]
    lines = summary.table(_write(tmp_path, rows), (("g.yaml", "res", ""),))
    assert "shrunk" not in lines[0] and "+0.020 vs uniform" in lines[2], lines[:3]  # the margin ignores it
    head = f"Fisher per weight shrunk 0.5 ({summary.CANDIDATES['fisher_ws']}) against "
    k = lines.index(head + "each row's best baseline by mean (as the targets above), at the 1 rows it ran "
                    "(generated):")
    assert lines[k + 1] == "- beyond the spread, higher mean (1): CoLA avg 2, {1,2,3,4} (+0.050 vs uniform)"
    i = lines.index(head + "Fisher per tensor (nasq's default), head to head, at the 1 rows both ran (generated):")
    assert lines[i + 1] == "- beyond the spread, higher mean (1): CoLA avg 2, {1,2,3,4} (+0.030 vs Fisher per tensor)"
    j = lines.index(head + "Fisher per weight (the other granularity), head to head, at the 1 rows both ran "
                    "(generated):")
    assert lines[j + 4] == "- lower mean, beyond the spread (1): CoLA avg 2, {1,2,3,4} (-0.010 vs Fisher per weight)"
    lines = summary.table(_write(tmp_path / "b", [r for r in rows if r[1] != "fisher_ws"]), (("g.yaml", "res", ""),))
    assert not any("shrunk" in ln for ln in lines), lines
