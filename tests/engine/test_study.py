"""The offline study: its statistics against scipy/numpy oracles, evidence on the lesion on hand-built maps,
and one end-to-end ``cxr-drift study`` run with its one-line errors."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from cli.main import main
from engine.ranking import kendall_tau, method_tables, rank_models, reversal_test
from engine.study import (
    bootstrap_ci,
    describe,
    evidence_on_lesion,
    holm_adjust,
    paired_wilcoxon,
    render_markdown,
    summarize,
)
from engine.study.statistics import MIN_N_FOR_CI, PRIMARY_METRICS
from training.synth import generate_dataset

# ------------------------------------------------------------------------------------ descriptive stats


def test_describe_matches_numpy_and_the_ci_contains_the_mean() -> None:
    x = np.random.default_rng(1).beta(4, 2, size=60)
    s = describe(x, n_boot=2000, seed=3)
    q1, median, q3 = np.percentile(x, [25, 50, 75])
    assert s["n"] == 60
    assert s["mean"] == pytest.approx(x.mean())
    assert s["sd"] == pytest.approx(x.std(ddof=1))
    assert (s["median"], s["q1"], s["q3"]) == pytest.approx((median, q1, q3))
    assert s["iqr"] == pytest.approx(q3 - q1)
    assert s["ci_low"] < s["mean"] < s["ci_high"]


def test_bootstrap_is_seeded_and_equals_scipys_bca() -> None:
    x = np.random.default_rng(2).gamma(2.0, size=40)
    assert bootstrap_ci(x, n_boot=500, seed=7) == bootstrap_ci(x, n_boot=500, seed=7)
    assert bootstrap_ci(x, n_boot=500, seed=7) != bootstrap_ci(x, n_boot=500, seed=8)
    # chunked resampling draws the same indices as one block
    assert bootstrap_ci(x, n_boot=500, seed=7, chunk=40 * 3) == bootstrap_ci(x, n_boot=500, seed=7)
    for n, confidence in ((15, 0.95), (40, 0.95), (200, 0.9)):
        y = np.random.default_rng(n).beta(4, 2, size=n)
        low, high = bootstrap_ci(y, n_boot=3000, seed=5, confidence=confidence)
        ref = stats.bootstrap(
            (y,),
            np.mean,
            n_resamples=3000,
            method="BCa",
            confidence_level=confidence,
            rng=np.random.default_rng(5),
        ).confidence_interval
        assert (low, high) == pytest.approx((ref.low, ref.high), rel=1e-9, abs=1e-12)


def test_small_groups_get_no_ci_and_constant_ones_a_point() -> None:
    x = np.random.default_rng(3).random(MIN_N_FOR_CI - 1)
    assert bootstrap_ci(x) == (None, None)
    assert None not in bootstrap_ci(np.append(x, 0.5))
    assert bootstrap_ci([0.3] * 20) == (0.3, 0.3)
    small = describe(x)
    assert small["n"] == MIN_N_FOR_CI - 1 and small["mean"] == pytest.approx(x.mean())
    assert small["ci_low"] is None and small["ci_high"] is None
    with pytest.raises(ValueError, match="min_n"):
        bootstrap_ci(x, min_n=1)


def test_describe_degenerate_inputs_are_defined() -> None:
    empty = describe([None, float("nan"), ""])
    assert empty["n"] == 0 and empty["mean"] is None and empty["ci_low"] is None
    one = describe([0.25, None])
    assert one["n"] == 1 and one["sd"] is None and one["ci_low"] is None and one["ci_high"] is None
    json.dumps(empty), json.dumps(one)  # JSON-safe: no NaN
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)


# ------------------------------------------------------------------------------------ tests and rankings


def test_paired_wilcoxon_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    a = rng.random(30)
    b = a + rng.normal(0.05, 0.1, 30)
    b[:3] = a[:3]  # zero differences are dropped, as scipy's default
    out = paired_wilcoxon(a, b)
    ref = stats.wilcoxon(a, b)
    assert out["statistic"] == pytest.approx(ref.statistic)
    assert out["p_value"] == pytest.approx(ref.pvalue)
    assert (out["n_pairs"], out["n_nonzero"]) == (30, 27)
    assert out["median_difference"] == pytest.approx(np.median(a - b))
    assert -1.0 <= out["effect_size"] < 0  # a tends to be smaller than b
    assert out["note"] == ""


def test_paired_wilcoxon_edge_cases_are_defined() -> None:
    same = paired_wilcoxon([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert same["statistic"] == 0.0 and same["p_value"] == 1.0 and "zero" in same["note"]
    nothing = paired_wilcoxon([], [])
    assert nothing["p_value"] is None and nothing["note"] == "no paired values"
    few = paired_wilcoxon([0.1, 0.5, 0.9], [0.2, 0.3, 0.4])
    assert few["p_value"] == pytest.approx(stats.wilcoxon([0.1, 0.5, 0.9], [0.2, 0.3, 0.4]).pvalue)
    assert "cannot fall below 0.05" in few["note"]
    missing = paired_wilcoxon([0.1, np.nan, 0.4, 0.8], [0.2, 0.3, np.nan, 0.1])
    assert missing["n_pairs"] == 2
    with pytest.raises(ValueError, match="same length"):
        paired_wilcoxon([1.0], [1.0, 2.0])


def test_kendall_tau_matches_scipy_and_detects_a_reversal() -> None:
    layercam = {"inceptionv3": 0.777, "densenet201": 0.70, "resnet50v2": 0.62}
    gradcampp = {"inceptionv3": 0.645, "densenet201": 0.74, "resnet50v2": 0.66}
    out = kendall_tau(layercam, gradcampp)
    models = sorted(layercam)
    ref = stats.kendalltau([layercam[m] for m in models], [gradcampp[m] for m in models])
    assert out["tau"] == pytest.approx(ref.statistic) and out["p_value"] == pytest.approx(ref.pvalue)
    assert out["tau"] < 0
    assert sorted(map(tuple, out["reversed_pairs"])) == [
        ("densenet201", "inceptionv3"),
        ("inceptionv3", "resnet50v2"),
    ]
    assert rank_models(layercam) == ["inceptionv3", "densenet201", "resnet50v2"]
    assert rank_models(gradcampp) == ["densenet201", "resnet50v2", "inceptionv3"]
    assert kendall_tau(layercam, layercam)["tau"] == pytest.approx(1.0)
    assert kendall_tau({"a": 0.5}, {"a": 0.4})["tau"] is None
    tied = kendall_tau({"a": 0.5, "b": 0.5}, {"a": 0.4, "b": 0.6})
    assert tied["tau"] is None and "tie" in tied["note"]


def test_holm_adjust() -> None:
    assert holm_adjust([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])


def _reversal_rows() -> list[dict[str, Any]]:
    """Three architectures, 12 images: under LayerCAM inceptionv3 is most stable, under GradCAM++ least."""
    rng = np.random.default_rng(0)
    centre = {
        ("layercam", "inceptionv3"): 0.78,
        ("layercam", "densenet201"): 0.70,
        ("layercam", "resnet50v2"): 0.60,
        ("gradcampp", "inceptionv3"): 0.55,
        ("gradcampp", "densenet201"): 0.75,
        ("gradcampp", "resnet50v2"): 0.65,
    }
    rows = []
    for (method, model), c in centre.items():
        for i in range(12):
            if model == "resnet50v2" and i == 11:
                continue  # an image one architecture did not get right: left out of its pairs
            iou = float(np.clip(c + rng.normal(0, 0.03), 0, 1))
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "image": f"img{i}.png",
                    "label": "a" if i % 2 else "b",
                    "iou": iou,
                    "drift_score": 1 - iou,
                    "transfer_topk_in_lesion": 0.2 if i % 2 else None,
                    "finetuned_topk_in_lesion": 0.3 + 0.01 * i if i % 2 else None,
                }
            )
    return rows


def test_summarize_ranks_tests_and_reports_the_reversal() -> None:
    rows = _reversal_rows()
    summary = summarize(rows, metrics=("iou", "drift_score"), n_boot=300, seed=1)
    assert summary == summarize(rows, metrics=("iou", "drift_score"), n_boot=300, seed=1)  # seeded
    json.dumps(summary)
    overall = {(g["model"], g["method"]): g for g in summary["groups"] if g["class"] == "all"}
    assert len(overall) == 6
    g = overall[("densenet201", "layercam")]
    values = [r["iou"] for r in rows if r["model"] == "densenet201" and r["method"] == "layercam"]
    assert g["metrics"]["iou"]["mean"] == pytest.approx(np.mean(values))
    per_class = [s for s in summary["groups"] if s["class"] == "a" and s["model"] == "densenet201"]
    assert len(per_class) == 2 and per_class[0]["metrics"]["iou"]["n"] == 6

    # the ranking is on the 11 images every architecture has under both methods (img11 is left out)
    rankings = summary["rankings"]
    assert rankings["n_images"] == 11 and rankings["models"] == ["densenet201", "inceptionv3", "resnet50v2"]
    common = [f"img{i}.png" for i in range(11)]
    for method, expected in (
        ("layercam", ["inceptionv3", "densenet201", "resnet50v2"]),
        ("gradcampp", ["densenet201", "resnet50v2", "inceptionv3"]),
    ):
        entries = rankings["methods"][method]
        assert [e["model"] for e in entries] == expected
        for e in entries:
            kept = [r["iou"] for r in rows if (r["model"], r["method"]) == (e["model"], method)]
            assert e["mean"] == pytest.approx(np.mean(kept[:11]))
    (comparison,) = rankings["comparisons"]
    assert comparison["n_images"] == 11 and comparison["n_images_left_out"] == 1 and comparison["n"] == 3
    assert comparison["tau"] < 0 and comparison["top_changes"]
    assert comparison["relative_change"]["inceptionv3"] < -0.2
    # a strong interaction: the inferential verdict and the descriptive rule agree
    assert comparison["reversal"] is True and comparison["reversal_descriptive"] is True
    assert comparison["bootstrap"]["p_order_differs"] > 0.9
    assert comparison["control"] is None and summary["config"]["control_column"] is None
    # the study's test is engine.ranking's on the same per-image values
    tables = method_tables((r["image"], r["model"], r["method"], r["iou"]) for r in rows)
    ref = reversal_test(tables["layercam"], tables["gradcampp"], n_boot=300, seed=1)
    assert {k: comparison[k] for k in ref} == ref
    assert all(t["n"] == 11 for t in comparison["interaction_tests"])
    assert {r["image"] for r in rows} - set(common) == {"img11.png"}

    test = next(
        t
        for t in summary["paired_tests"]
        if (t["method"], t["metric"], t["model_a"], t["model_b"])
        == ("layercam", "iou", "densenet201", "resnet50v2")
    )
    a = [r["iou"] for r in rows if (r["model"], r["method"]) == ("densenet201", "layercam")][:11]
    b = [r["iou"] for r in rows if (r["model"], r["method"]) == ("resnet50v2", "layercam")]
    assert test["n_pairs"] == 11 and test["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    # Holm within each method over the primary metrics only; drift_score (= 1 - IoU) is descriptive
    for method in ("layercam", "gradcampp"):
        primary = [t for t in summary["paired_tests"] if t["method"] == method and t["family"] == "primary"]
        assert {t["metric"] for t in primary} == {"iou"} and len(primary) == 3
        assert [t["p_holm"] for t in primary] == holm_adjust([t["p_value"] for t in primary])
    descriptive = [t for t in summary["paired_tests"] if t["family"] == "descriptive"]
    assert {t["metric"] for t in descriptive} == {"drift_score"}
    assert all(t["p_holm"] is None and t["p_value"] is not None for t in descriptive)

    lesion = [t for t in summary["lesion_tests"] if t["model"] == "inceptionv3" and t["method"] == "layercam"]
    assert lesion and lesion[0]["n_pairs"] == 6 and lesion[0]["mean_difference"] > 0  # moved onto the lesion

    text = render_markdown(summary)
    assert "| rank | layercam | gradcampp |" in text and "Kendall tau = -" in text
    assert "layercam vs gradcampp: **reversal**" in text and "P(order differs) = " in text
    assert "| pair | n | median d" in text and "| densenet201 - inceptionv3 | 11 |" in text
    assert "[no CI]" in text  # per class: 6 images each, below MIN_N_FOR_CI


def test_the_primary_family_is_pre_declared() -> None:
    rows = _reversal_rows()
    rng = np.random.default_rng(5)
    for row in rows:
        row.update(pearson=float(rng.random()), ssim=float(rng.random()), emd=float(rng.random()))
        row.update(centroid_shift=float(rng.random()))
    summary = summarize(
        rows, metrics=("iou", "pearson", "ssim", "centroid_shift", "emd", "drift_score"), n_boot=50
    )
    assert summary["config"]["primary_metrics"] == list(PRIMARY_METRICS)
    for method in ("layercam", "gradcampp"):
        tests = [t for t in summary["paired_tests"] if t["method"] == method]
        primary = [t for t in tests if t["metric"] in PRIMARY_METRICS]
        assert all(t["family"] == "primary" for t in primary) and len(primary) == 4 * 3
        assert [t["p_holm"] for t in primary] == pytest.approx(holm_adjust([t["p_value"] for t in primary]))
        others = [t for t in tests if t["metric"] not in PRIMARY_METRICS]
        assert {t["metric"] for t in others} == {"emd", "drift_score"}
        assert all(t["family"] == "descriptive" and t["p_holm"] is None for t in others)


def test_no_interaction_is_described_but_not_called_a_reversal() -> None:
    rng = np.random.default_rng(3)
    rows = []
    for i in range(20):  # the same small architecture effects under both methods: any swap is chance
        image = rng.normal(0, 0.1)
        for method, shift in (("layercam", 0.0), ("gradcampp", -0.1)):
            for model, effect in (("densenet201", 0.6), ("resnet50v2", 0.605)):
                iou = effect + shift + image + rng.normal(0, 0.1)
                rows.append({"model": model, "method": method, "image": f"i{i}", "label": "x", "iou": iou})
    (comparison,) = summarize(rows, metrics=("iou",), n_boot=200)["rankings"]["comparisons"]
    assert comparison["reversal_descriptive"] is True  # this seed's means swap by chance
    assert comparison["reversal"] is False
    assert comparison["interaction_tests"][0]["p_holm"] > 0.05


def test_the_reversal_is_repeated_under_the_head_scale_control() -> None:
    rows = _reversal_rows()
    for row in rows:  # under the control, GradCAM++ keeps LayerCAM's order: the reversal goes away
        if row["method"] == "gradcampp":
            layercam = next(
                r["iou"]
                for r in rows
                if (r["model"], r["image"], r["method"]) == (row["model"], row["image"], "layercam")
            )
            row["head_scale_control_iou"] = layercam - 0.05
    summary = summarize(rows, metrics=("iou",), n_boot=200, seed=3)
    (comparison,) = summary["rankings"]["comparisons"]
    control = comparison["control"]
    assert summary["config"]["control_column"] == "head_scale_control_iou"
    assert control["column"] == "head_scale_control_iou" and control["replaces"] == "gradcampp"
    assert comparison["reversal"] is True and control["reversal"] is False
    assert control["n_images"] == 11 and control["order_b"] == control["order_a"]
    assert "Under the head-scale control (`head_scale_control_iou` in place of gradcampp)" in render_markdown(
        summary
    )
    named = summarize(rows, metrics=("iou",), n_boot=50, control_column="missing")
    assert named["rankings"]["comparisons"][0]["control"] is None


# ------------------------------------------------------------------------------------ evidence on lesion


def test_evidence_on_lesion_on_hand_built_maps() -> None:
    mask = np.zeros((10, 10))
    mask[:5] = 1  # upper half
    inside = np.zeros((10, 10))
    inside[:2] = 1.0  # 20 pixels = the top 20%, all inside
    outside = np.zeros((10, 10))
    outside[8:] = 1.0
    e = evidence_on_lesion(inside, mask, topk_percent=20)
    assert (e["topk_in_lesion"], e["mass_in_lesion"], e["lesion_area"], e["all_zero"]) == (
        1.0,
        1.0,
        0.5,
        False,
    )
    e = evidence_on_lesion(outside, mask, topk_percent=20)
    assert (e["topk_in_lesion"], e["mass_in_lesion"]) == (0.0, 0.0)
    half = np.zeros((10, 10))
    half[4:6] = 1.0  # straddles the border: row 4 inside, row 5 outside
    half[4, 0] = 3.0
    e = evidence_on_lesion(half, mask, topk_percent=20)
    assert e["topk_in_lesion"] == 0.5 and e["mass_in_lesion"] == pytest.approx(12 / 22)
    zero = evidence_on_lesion(np.zeros((10, 10)), mask)
    assert zero["all_zero"] and zero["topk_in_lesion"] == zero["mass_in_lesion"] == 0.5
    soft = evidence_on_lesion(inside, mask * 0.5, topk_percent=20)
    assert soft["topk_in_lesion"] == 0.5 and soft["mass_in_lesion"] == 0.5


@pytest.mark.parametrize(
    ("attribution", "mask", "message"),
    [
        (np.ones((4, 4)), np.zeros((4, 4)), "empty"),
        (np.ones((4, 4)), np.ones((5, 5)), "shape"),
        (-np.ones((4, 4)), np.ones((4, 4)), "non-negative"),
        (np.ones((4, 4)), 2 * np.ones((4, 4)), r"\[0, 1\]"),
        (np.ones(4), np.ones(4), "2-D"),
    ],
)
def test_evidence_on_lesion_rejects_bad_input(attribution: Any, mask: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evidence_on_lesion(attribution, mask)


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def study_inputs(api_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The cached test pairs (densenet201, resnet50v2; the study only reads them) and a small synthetic set."""
    data = tmp_path_factory.mktemp("study") / "data"
    generate_dataset(data, n=25, size=96, progress=False)
    return api_artifacts, data


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_study_cli_writes_every_output(
    study_inputs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts, data = study_inputs
    monkeypatch.chdir(tmp_path)  # a --figure path relative to the working folder, not to --out
    out, figure = tmp_path / "out", Path("fig") / "example.png"
    argv = ["study", "--artifacts", str(artifacts), "--data", str(data), "--subset", "all"]
    argv += ["--bootstrap", "200", "--no-progress", "--out", str(out), "--figure", str(figure)]
    assert main([*argv, "--note", "random-init test models"]) == 0
    expected = [
        "per_image.csv",
        "summary.json",
        "summary.md",
        "report.html",
        "ranking.png",
        "lesion_evidence.png",
        "example.png",
    ]
    expected += ["iou_layercam.png", "iou_gradcampp.png"]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert 0 < figure.stat().st_size < 300_000

    rows = _read_csv(out / "per_image.csv")
    test_images = [r for r in _read_csv(data / "manifest.csv") if r["split"] == "test"]
    assert len(rows) == 2 * 2 * len(test_images)
    assert {r["model"] for r in rows} == {"resnet50v2", "densenet201"}
    for row in rows:
        assert row["target_class"] == row["label"]  # the true class's evidence
        assert row["included"] == "True"
        assert 0.0 <= float(row["iou"]) <= 1.0 and row["severity"] in ("low", "moderate", "high")
        assert float(row["drift_score"]) == pytest.approx(1 - float(row["iou"]), abs=1e-5)
        if row["label"] == "normal":
            assert row["transfer_topk_in_lesion"] == "" and row["finetuned_mass_in_lesion"] == ""
        else:
            for column in ("transfer_topk_in_lesion", "finetuned_topk_in_lesion", "finetuned_mass_in_lesion"):
                assert 0.0 <= float(row[column]) <= 1.0
            change = float(row["finetuned_topk_in_lesion"]) - float(row["transfer_topk_in_lesion"])
            assert float(row["topk_in_lesion_change"]) == pytest.approx(change, abs=1e-5)

    assert {r["zones"] for r in rows} == {"lung"}  # synthetic data has lung masks: lung zones, not thirds
    control = [r for r in rows if r["method"] == "gradcampp"]
    assert all(0.0 <= float(r["head_scale_control_iou"]) <= 1.0 for r in control)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == ["densenet201", "resnet50v2"]
    assert summary["rankings"]["comparisons"][0]["control"]["column"] == "head_scale_control_iou"
    assert summary["methods"] == ["layercam", "gradcampp"]
    assert summary["study"]["synthetic_lesion_masks"] is True
    assert summary["rankings"]["comparisons"][0]["n"] == 2
    assert summary["lesion_tests"]
    assert "Stability ranking" in (out / "summary.md").read_text()
    page = (out / "report.html").read_text()
    assert "Stability ranking" in page and page.count("data:image/png;base64,") >= 4
    assert not re.search(r"(src|href)=\"(?!data:)", page), "the report fetches nothing"


def test_study_cli_true_positive_subset(study_inputs: tuple[Path, Path], tmp_path: Path) -> None:
    artifacts, data = study_inputs
    out = tmp_path / "tp"
    argv = ["study", "--model-dir", str(artifacts / "resnet50v2"), "--data", str(data), "--no-plots"]
    default = main([*argv, "--bootstrap", "50", "--no-progress", "--out", str(tmp_path / "both")])
    rows = _read_csv(tmp_path / "both" / "per_image.csv")  # the primary subset: both checkpoints right
    both = [r["finetuned_correct"] == r["transfer_correct"] == "True" for r in rows]
    assert rows and [r["included"] == "True" for r in rows] == both
    assert default == (0 if any(both) else 2)
    code = main([*argv, "--subset", "true_positive", "--bootstrap", "50", "--no-progress", "--out", str(out)])
    rows = _read_csv(out / "per_image.csv")
    assert rows and all(r["included"] == r["finetuned_correct"] for r in rows)
    true_positives = sum(r["included"] == "True" for r in rows if r["method"] == "layercam")
    if true_positives:
        assert code == 0
        summary = json.loads((out / "summary.json").read_text())
        overall = next(g for g in summary["groups"] if g["class"] == "all" and g["method"] == "layercam")
        assert overall["metrics"]["iou"]["n"] == true_positives
    else:  # random-init models may get no test image right: a one-line error, the table still written
        assert code == 2


def test_study_cli_errors_are_one_line(
    study_inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts, data = study_inputs
    out = str(tmp_path / "out")
    train_only = tmp_path / "train_only.csv"
    rows = [r for r in _read_csv(data / "manifest.csv") if r["split"] == "train"]
    train_only.write_text(
        "path,label,split\n" + "".join(f"{data / r['path']},{r['label']},train\n" for r in rows)
    )
    (tmp_path / "empty").mkdir()
    cases = [
        (["--artifacts", str(tmp_path / "missing"), "--data", str(data)], "does not exist"),
        (["--artifacts", str(tmp_path / "empty"), "--data", str(data)], "no model-pair folders"),
        (["--data", str(data)], "no model pairs given"),
        (["--artifacts", str(artifacts), "--data", str(train_only)], "has no images"),
        (
            ["--artifacts", str(artifacts), "--data", str(data), "--subset", "bogus"],
            "invalid choice: 'bogus'",
        ),
        (["--artifacts", str(artifacts), "--data", str(data), "--limit", "0"], "--limit"),
    ]
    for args, message in cases:
        code = main(["study", *args, "--no-progress", "--out", out])
        err = capsys.readouterr().err.strip()
        assert code != 0, args
        assert "\n" not in err and message in err, (args, err)


def test_study_statistics_import_no_plotting_web_stack_or_torch() -> None:
    code = (
        "import sys, engine.study, cli.study\n"
        "bad = ('matplotlib', 'fastapi', 'sqlalchemy', 'torch', 'starlette')\n"
        "print(','.join(sorted(m for m in bad if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def test_study_compares_a_second_set_of_pairs_on_the_same_images(
    study_inputs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same pair as baseline and candidate: identical per-image values, nothing significant."""
    import shutil

    artifacts, data = study_inputs
    baseline = tmp_path / "old"
    shutil.copytree(artifacts / "resnet50v2", baseline / "resnet50v2-old")
    out = tmp_path / "versions"
    argv = ["study", "--model-dir", str(artifacts / "resnet50v2"), "--data", str(data), "--subset", "all"]
    argv += ["--compare-artifacts", str(baseline), "--bootstrap", "100", "--no-plots", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    versions = json.loads((out / "versions.json").read_text())
    compared = versions["resnet50v2"]
    assert (compared["baseline"], compared["candidate"]) == ("resnet50v2", "resnet50v2")
    rows = [r for r in _read_csv(out / "per_image.csv") if r["method"] == "layercam"]
    layercam = compared["methods"]["layercam"]
    assert layercam["a"]["n"] == layercam["b"]["n"] == len(rows)
    assert layercam["difference"]["drift_score"]["mean_difference"] == pytest.approx(0.0, abs=1e-9)
    assert (
        layercam["significant"] is False and layercam["paired"]["note"] == "all paired differences are zero"
    )
    assert "versions resnet50v2 layercam" in capsys.readouterr().out
