"""Blinded user study (paper 3, 3.4 and 4.2): questionnaires, the answer server, the analysis."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_cohort
from scipy import stats

from voxplain.config import StudyAnalyseConfig, StudyMakeConfig, StudyServeConfig
from voxplain.study.analyse import (
    analyse,
    derandomise,
    inter_observer_reliability,
    kmo,
    mean_ci,
    method_t_tests,
    order_effect,
    preference_factor,
    question_ranks,
    repeated_measures_anova,
    z_normalise,
)
from voxplain.study.make import (
    StudyFolder,
    make_questionnaires,
    overlay,
    representative_slice,
)
from voxplain.study.serve import AnswerStore, QuestionnaireServer, issue_links

#: Distinctive names, so that a byte search for them cannot hit by chance.
METHODS = ["gradcamplusplus", "occlusion", "smoothgrad", "deepliftshap"]
#: True quality of each method in rater-noise standard deviations (best first).
QUALITY = {"gradcamplusplus": 1.5, "occlusion": 0.5, "smoothgrad": -0.5, "deepliftshap": -1.5}
CRITERIA = ["intuitive validity", "semantic meaningfulness", "image quality"]


def write_explained_run(root: Path, spatial: tuple[int, ...] = (32, 32), per_class: int = 6,
                        wrong: int = 2, methods: list[str] = METHODS) -> Path:
    """A run folder with cohort.tsv and explanations/METHOD/fold-0/run-0 of every method;
    the first ``wrong`` sessions of each class are misclassified."""
    rng = np.random.default_rng(0)
    if len(spatial) == 3:
        write_cohort(root / "data", subjects=2 * (per_class + wrong), sessions=1, shape=spatial)
        cohort = pd.read_csv(root / "data" / "cohort.tsv", sep="\t")
        cohort["path"] = [str(root / "data" / p) for p in cohort["path"]]
    else:
        rows = []
        (root / "data").mkdir(parents=True)
        for subject in range(2 * (per_class + wrong)):
            path = root / "data" / f"sub-{subject:02d}.npy"
            np.save(path, rng.random(spatial).astype(np.float32))
            rows.append({"participant_id": f"sub-{subject:02d}", "session_id": "ses-M00",
                         "diagnosis": "malignant" if subject % 2 else "benign",
                         "path": str(path)})
        cohort = pd.DataFrame(rows)
    cohort.to_csv(root / "cohort.tsv", sep="\t", index=False)
    for method in methods:
        folder = root / "explanations" / method / "fold-0" / "run-0"
        folder.mkdir(parents=True)
        index = []
        for number, row in enumerate(cohort.itertuples()):
            suffix = ".nii.gz" if len(spatial) == 3 else ".npy"
            relevance = rng.standard_normal(spatial).astype(np.float32)
            if suffix == ".npy":
                np.save(folder / f"{row.participant_id}_{row.session_id}.npy", relevance)
            else:
                import nibabel as nib
                nib.save(nib.Nifti1Image(relevance, np.eye(4)),
                         folder / f"{row.participant_id}_{row.session_id}.nii.gz")
            correct = number // 2 >= wrong
            other = min(set(cohort["diagnosis"]) - {row.diagnosis})
            index.append({"participant_id": row.participant_id, "session_id": row.session_id,
                          "diagnosis": row.diagnosis, "target": row.diagnosis,
                          "predicted": row.diagnosis if correct else other,
                          "probability": 0.9, "method": method, "layer": ""})
        pd.DataFrame(index).to_csv(folder / "index.tsv", sep="\t", index=False)
    return root


def simulate_raters(key: pd.DataFrame, raters: int = 8, noise: float = 1.0,
                    order_bonus: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Answers of raters (half on A, half on B) whose scores follow QUALITY (in noise SDs),
    a sample effect, a rater bias, a preference shared by the criteria, rater noise, and
    ``order_bonus`` for the image shown first."""
    rng = np.random.default_rng(seed)
    sample_effect = {q: rng.normal(0, 0.5) for q in key["question"].unique()}
    rows = []
    for rater in range(raters):
        variant = "A" if rater % 2 == 0 else "B"
        bias = rng.normal(0, 0.5)
        for image in key.itertuples():
            shared = rng.normal(0, 0.7)
            position = image.position_A if variant == "A" else image.position_B
            for criterion in CRITERIA:
                value = (QUALITY[image.method] + sample_effect[image.question] + bias + shared
                         + noise * rng.standard_normal() + order_bonus * (position == 1))
                rows.append({"rater": f"rater{rater}", "variant": variant,
                             "question": image.question, "image": image.image,
                             "criterion": criterion,
                             "score": int(np.clip(np.round(2 * value), -4, 4))})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study_2d(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    run = write_explained_run(tmp_path_factory.mktemp("run2d"))
    key = make_questionnaires(StudyMakeConfig(run=run, samples_per_class=6, seed=3, pixels=64))
    return run / "study", key


def test_questionnaire_draws_correctly_classified_samples_per_class(study_2d):
    _, key = study_2d
    samples = key.drop_duplicates("question")
    assert samples["diagnosis"].value_counts().to_dict() == {"benign": 6, "malignant": 6}
    # sessions 0-3 (the first two of each class) were misclassified by the fixture
    assert not set(samples["participant_id"]) & {"sub-00", "sub-01", "sub-02", "sub-03"}
    assert (key.groupby("question")["method"].apply(sorted) == [sorted(METHODS)] * 12).all()


def test_variant_b_shows_each_question_in_reverse_order_of_a(study_2d):
    folder, key = study_2d
    questionnaire = StudyFolder(folder).questionnaire()
    a, b = questionnaire["variants"]["A"], questionnaire["variants"]["B"]
    assert [q["question"] for q in a] == [q["question"] for q in b]
    orders = set()
    for qa, qb in zip(a, b):
        assert qb["images"] == qa["images"][::-1]
        rows = key[key["question"] == qa["question"]].set_index("image")
        assert list(rows.loc[qa["images"], "position_A"]) == [1, 2, 3, 4]
        assert list(rows.loc[qb["images"], "position_B"]) == [1, 2, 3, 4]
        orders.add(tuple(rows.loc[qa["images"], "method"]))
    assert len(orders) > 1, "the method order must be randomised per question"


def test_questionnaire_is_seeded(tmp_path, study_2d):
    _, key = study_2d
    run = write_explained_run(tmp_path / "run")
    same = make_questionnaires(StudyMakeConfig(run=run, samples_per_class=6, seed=3, pixels=64,
                                               out=tmp_path / "same"))
    other = make_questionnaires(StudyMakeConfig(run=run, samples_per_class=6, seed=4, pixels=64,
                                                out=tmp_path / "other"))
    pd.testing.assert_frame_equal(same, key)
    assert not same[["participant_id", "method", "position_A"]].equals(
        other[["participant_id", "method", "position_A"]])


def test_too_few_correct_samples_is_an_error_naming_the_class(tmp_path):
    run = write_explained_run(tmp_path / "run", per_class=2)
    with pytest.raises(ValueError, match="only 2 correctly classified 'benign'"):
        make_questionnaires(StudyMakeConfig(run=run, samples_per_class=3))


def test_a_class_without_correct_samples_is_an_error_not_a_smaller_study(tmp_path):
    run = write_explained_run(tmp_path / "run", per_class=2)
    for index_file in run.glob("explanations/*/fold-0/run-0/index.tsv"):
        index = pd.read_csv(index_file, sep="\t")
        index.loc[index["diagnosis"] == "malignant", "predicted"] = "benign"
        index.to_csv(index_file, sep="\t", index=False)
    with pytest.raises(ValueError, match="only 0 correctly classified 'malignant'"):
        make_questionnaires(StudyMakeConfig(run=run, samples_per_class=1))


def test_overlay_is_grey_where_the_map_is_zero_and_red_or_blue_by_sign():
    image = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    relevance = np.zeros((3, 4), dtype=np.float32)
    relevance[0, 0], relevance[2, 3], relevance[0, 3] = 2.0, -2.0, 1.0
    rgb = overlay(image, relevance).astype(int)
    assert rgb.shape == (3, 4, 3)
    grey = rgb[1:2, :]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert rgb[1, 1, 0] == round(image[1, 1] * 255)
    assert rgb[0, 0, 0] > rgb[0, 0, 2] + 40   # positive: red (RdBu_r), on black
    assert rgb[2, 3, 2] > rgb[2, 3, 0] + 40   # negative: blue, on white


def test_representative_slice_scales_each_map_to_its_own_maximum():
    maps = [np.zeros((4, 4, 9)) for _ in range(3)]
    maps[0][1, 1, 3] = 10.0   # the largest raw value ...
    maps[1][2, 2, 7] = 1.0    # ... but two methods agree on slice 7
    maps[2][2, 2, 7] = 0.5
    assert representative_slice(maps) == 7


def test_volumes_show_one_axial_slice_per_question(tmp_path):
    run = write_explained_run(tmp_path / "run", spatial=(20, 24, 20), per_class=2, wrong=1,
                              methods=METHODS[:2])
    key = make_questionnaires(StudyMakeConfig(run=run, samples_per_class=2, pixels=48))
    assert key.groupby("question")["slice"].nunique().eq(1).all()
    assert key["slice"].between(0, 19).all()
    from PIL import Image
    sizes = {Image.open(p).size for p in (run / "study/questionnaire/images").glob("*.png")}
    assert sizes == {(60, 72)}  # (W, H): (20, 24) rotated to (24, 20), enlarged x3 (>= 48)
    import nibabel as nib
    for (participant, session), rows in key.groupby(["participant_id", "session_id"]):
        maps = [np.asarray(nib.load(run / "explanations" / m / "fold-0" / "run-0" /
                                    f"{participant}_{session}.nii.gz").dataobj) for m in METHODS[:2]]
        assert rows["slice"].iloc[0] == representative_slice(maps)


def _served(link: str, route: str = "", data: bytes | None = None) -> bytes:
    """The reply to ``route`` (e.g. "answers") requested with the token of a rater's link."""
    url = link.replace("/?", f"/{route}?", 1)
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.read()


@pytest.fixture
def server(study_2d, tmp_path):
    """Variant A served on a free port; yields the links of raters r1 and ada, and the database."""
    folder, _ = study_2d
    database = tmp_path / "answers.sqlite"
    httpd = QuestionnaireServer(StudyServeConfig(study=folder, variant="A", port=0,
                                                 database=database))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield issue_links(httpd, ["r1", "ada"]), database
    httpd.shutdown()
    httpd.server_close()


def test_2d_nifti_maps_make_the_same_questionnaire_as_the_npy_maps_of_earlier_versions(tmp_path):
    import nibabel as nib

    runs = [write_explained_run(tmp_path / kind, methods=METHODS[:2]) for kind in ("npy", "nii")]
    for path in sorted((runs[1] / "explanations").rglob("*.npy")):
        nib.save(nib.Nifti1Image(np.load(path)[..., np.newaxis], np.diag([0.7, 0.7, 1.0, 1.0])),
                 path.with_name(path.name.replace(".npy", ".nii.gz")))
        path.unlink()
    keys = [make_questionnaires(StudyMakeConfig(run=run, samples_per_class=2, seed=3, pixels=32))
            for run in runs]
    pd.testing.assert_frame_equal(*keys)
    images = [sorted(StudyFolder(run / "study").image_dir.iterdir()) for run in runs]
    assert [path.name for path in images[0]] == [path.name for path in images[1]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*images))


def test_server_listens_on_localhost_only(study_2d, tmp_path):
    httpd = QuestionnaireServer(StudyServeConfig(study=study_2d[0], variant="B", port=0,
                                                 database=tmp_path / "answers.sqlite"))
    try:
        assert httpd.socket.getsockname()[0] == "127.0.0.1"
    finally:
        httpd.server_close()


def test_resent_answer_updates_its_row_instead_of_adding_one(server, study_2d):
    links, database = server
    question = StudyFolder(study_2d[0]).questionnaire()["variants"]["A"][0]
    answer = {"question": question["question"], "image": question["images"][0],
              "criterion": CRITERIA[0], "score": 2}
    _served(links["r1"], "answer", json.dumps(answer).encode())
    _served(links["r1"], "answer", json.dumps({**answer, "score": -3}).encode())
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT rater, variant, score FROM answers").fetchall()
    assert rows == [("r1", "A", -3)]
    bad = {**answer, "score": 5}
    with pytest.raises(urllib.error.HTTPError, match="400"):
        _served(links["r1"], "answer", json.dumps(bad).encode())


def test_blinding_no_method_name_in_any_file_or_page_a_rater_can_see(study_2d, server, tmp_path):
    folder, key = study_2d
    links, database = server
    assert StudyFolder(folder).key_file.parent == folder  # the key is outside questionnaire/
    questionnaire = StudyFolder(folder).questionnaire()
    question = questionnaire["variants"]["A"][0]
    _served(links["r1"], "answer", json.dumps({"question": question["question"],
                                               "image": question["images"][1],
                                               "criterion": CRITERIA[1], "score": 1}).encode())
    AnswerStore(database).export_csv(tmp_path / "export.csv")
    served = [_served(links["r1"]), _served(links["r1"], "answers"),
              *(_served(links["r1"], f"images/{image}.png") for image in question["images"])]
    files = [p for p in (folder / "questionnaire").rglob("*") if p.is_file()]
    files += [database, tmp_path / "export.csv"]
    assert len(files) > 12 * 5
    contents = [(str(p), p.read_bytes()) for p in files] + [
        (f"served page {k}", body) for k, body in enumerate(served)]
    for name in METHODS:
        for source, data in contents:
            assert name.encode() not in data.lower(), f"{name} appears in {source}"
            assert name not in source.lower(), f"{name} appears in the path {source}"
    assert set(key["method"]) == set(METHODS)  # the key alone de-randomises


def test_paper_answers_enter_through_csv_once(study_2d, tmp_path):
    folder, key = study_2d
    answers = simulate_raters(key, raters=2)
    answers.to_csv(tmp_path / "paper.csv", index=False)
    store = AnswerStore(tmp_path / "answers.sqlite")
    questionnaire = StudyFolder(folder).questionnaire()
    store.import_csv(tmp_path / "paper.csv", questionnaire)
    store.import_csv(tmp_path / "paper.csv", questionnaire)
    stored = store.answers()
    assert len(stored) == len(answers)
    pd.testing.assert_frame_equal(stored.reset_index(drop=True), answers.reset_index(drop=True),
                                  check_dtype=False)
    answers.loc[0, "score"] = 7
    answers.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv, line 2: score 7"):
        store.import_csv(tmp_path / "bad.csv", questionnaire)


def test_z_normalisation_over_all_answers_for_one_sample_and_criterion():
    answers = pd.DataFrame({"question": ["q1"] * 3 + ["q2"] * 2, "criterion": ["c"] * 5,
                            "score": [1.0, 2.0, 3.0, 4.0, 4.0]})
    z = z_normalise(answers).to_numpy()
    np.testing.assert_allclose(z, [-np.sqrt(1.5), 0, np.sqrt(1.5), 0, 0])


def test_ranks_within_rater_question_and_criterion_average_ties():
    answers = pd.DataFrame({"rater": ["r"] * 4, "question": ["q"] * 4, "criterion": ["c"] * 4,
                            "score": [3.0, 1.0, 1.0, -2.0]})
    assert question_ranks(answers).tolist() == [1.0, 2.5, 2.5, 4.0]


def test_inter_observer_reliability_eq7_mean_pairwise_pearson():
    scores = {"r1": [1, 2, 3, 4], "r2": [2, 4, 6, 8], "r3": [4, 3, 2, 1]}
    answers = pd.DataFrame([{"rater": r, "question": f"q{i}", "method": "m", "criterion": "c",
                             "score": float(s)} for r, v in scores.items()
                            for i, s in enumerate(v)])
    # pairs: r(1,2) = 1, r(1,3) = -1, r(2,3) = -1
    assert inter_observer_reliability(answers)["rho"].item() == pytest.approx(-1 / 3)


def test_mean_ci_is_the_t_interval():
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, low, high = mean_ci(values)
    expected = stats.t.interval(0.95, 3, loc=3.5, scale=stats.sem(values))
    assert (mean, low, high) == pytest.approx((3.5, *expected))


@pytest.fixture(scope="module")
def simulated(study_2d):
    _, key = study_2d
    answers = derandomise(simulate_raters(key, raters=8, seed=1), key)
    answers["z"] = z_normalise(answers)
    answers["rank"] = question_ranks(answers)
    return answers


def _per_rater_means(answers: pd.DataFrame, value: str, criterion: str, method: str):
    rows = answers[(answers["criterion"] == criterion) & (answers["method"] == method)]
    return np.array([rows.loc[rows["rater"] == r, value].mean()
                     for r in sorted(answers["rater"].unique())])


def test_t_tests_match_scipy_with_the_papers_n_minus_2_degrees_of_freedom(simulated):
    tests = method_t_tests(simulated, "z")
    assert len(tests) == len(CRITERIA) * 6
    for row in tests.itertuples():
        a = _per_rater_means(simulated, "z", row.criterion, row.method_1)
        b = _per_rater_means(simulated, "z", row.criterion, row.method_2)
        student = stats.ttest_ind(a, b)
        assert row.t == pytest.approx(student.statistic)
        assert row.df == 8 - 2
        assert row.p == pytest.approx(2 * stats.t.sf(abs(student.statistic), 6))
        assert row.p > student.pvalue  # fewer degrees of freedom than scipy's 14
        assert row.p_paired == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_analysis_recovers_the_planted_ranking_of_methods(simulated):
    truth = sorted(QUALITY, key=QUALITY.get, reverse=True)
    for criterion in CRITERIA:
        z = {m: _per_rater_means(simulated, "z", criterion, m).mean() for m in METHODS}
        rank = {m: _per_rater_means(simulated, "rank", criterion, m).mean() for m in METHODS}
        assert sorted(z, key=z.get, reverse=True) == truth
        assert sorted(rank, key=rank.get) == truth
    best = method_t_tests(simulated, "z")
    best = best[(best["method_1"] == "deepliftshap") & (best["method_2"] == "gradcamplusplus")]
    assert (best["p"] < 0.01).all()


@pytest.mark.parametrize("bonus, detected", [(1.0, True), (0.0, False)])
def test_order_effect_is_detected_when_planted_and_not_otherwise(study_2d, bonus, detected):
    _, key = study_2d
    answers = derandomise(simulate_raters(key, raters=8, order_bonus=bonus, seed=2), key)
    answers["z"] = z_normalise(answers)
    p = order_effect(answers)["p"]
    assert (p < 0.01).all() if detected else (p > 0.05).all()


def test_repeated_measures_anova_matches_statsmodels():
    anova_rm = pytest.importorskip("statsmodels.stats.anova",
                                   reason="statsmodels is the independent reference").AnovaRM
    table = np.random.default_rng(5).normal(size=(6, 4)) + np.arange(4) * 0.4
    long = pd.DataFrame([{"rater": r, "position": c, "z": table[r, c]}
                         for r in range(6) for c in range(4)])
    reference = anova_rm(long, "z", "rater", within=["position"]).fit().anova_table.iloc[0]
    f, df1, df2, p = repeated_measures_anova(table)
    assert (f, df1, df2, p) == pytest.approx((reference["F Value"], reference["Num DF"],
                                              reference["Den DF"], reference["Pr > F"]))


def test_criteria_correlation_kmo_and_pca_match_independent_formulas(simulated):
    matrix = simulated.pivot_table(index=["rater", "question", "method"], columns="criterion",
                                   values="score")
    r = np.corrcoef(matrix.to_numpy(), rowvar=False)
    np.testing.assert_allclose(matrix.corr().to_numpy(), r)
    inverse = np.linalg.inv(r)
    partial = -inverse / np.sqrt(np.outer(np.diag(inverse), np.diag(inverse)))
    off = ~np.eye(3, dtype=bool)
    expected_kmo = (r[off] ** 2).sum() / ((r[off] ** 2).sum() + (partial[off] ** 2).sum())
    assert kmo(matrix)[1] == pytest.approx(expected_kmo)
    eigenvalues, eigenvectors = np.linalg.eigh(r)
    phi, loadings, explained = preference_factor(matrix)
    assert explained == pytest.approx(eigenvalues[-1] / 3)
    vector = eigenvectors[:, -1] * np.sign(eigenvectors[:, -1].sum())
    np.testing.assert_allclose(loadings.to_numpy(), vector / np.abs(vector).sum())
    standardised = (matrix - matrix.mean()) / matrix.std(ddof=0)
    np.testing.assert_allclose(phi.to_numpy(), standardised.to_numpy() @ vector, atol=1e-9)


def test_analyse_writes_tables_and_figures_for_the_report(study_2d, tmp_path):
    folder, key = study_2d
    answers = simulate_raters(key, raters=4)
    answers.to_csv(tmp_path / "answers.csv", index=False)
    summary = analyse(StudyAnalyseConfig(study=folder, database=tmp_path / "db.sqlite",
                                         answers_csv=[tmp_path / "answers.csv"],
                                         out=tmp_path / "analysis"))
    assert summary["answers"] == len(answers) and summary["raters"] == 4
    for name in ["raw_scores", "z_scores", "ranks", "t_tests", "reliability", "variants",
                 "order_effect", "criteria_correlation", "preference_factor",
                 "preference_loadings", "z_scores_by_class"]:
        assert not pd.read_csv(tmp_path / "analysis" / f"{name}.tsv", sep="\t").empty, name
    for name in ["comparison", "criteria_dendrogram", "preference_factor"]:
        assert (tmp_path / "analysis" / f"{name}.png").stat().st_size > 1000
    raw = pd.read_csv(tmp_path / "analysis" / "raw_scores.tsv", sep="\t")
    mine = raw[(raw["method"] == "occlusion") & (raw["criterion"] == "image quality")]
    assert mine["mean"].item() == pytest.approx(
        _per_rater_means(derandomise(answers, key), "score", "image quality", "occlusion").mean())


def test_cli_study_make_and_analyse(tmp_path, study_2d):
    from typer.testing import CliRunner

    from voxplain.cli import app

    run = write_explained_run(tmp_path / "run", per_class=2, wrong=1, methods=METHODS[:2])
    result = CliRunner().invoke(app, ["study", "make", "--run", str(run),
                                      "--samples-per-class", "2", "--pixels", "32",
                                      "--criteria", "quality,plausibility"])
    assert result.exit_code == 0, result.output
    key = StudyFolder(run / "study").key()
    answers = simulate_raters(key, raters=4)
    answers["criterion"] = answers["criterion"].map(
        dict(zip(CRITERIA, ["quality", "plausibility", None]))).dropna()
    answers.dropna().to_csv(tmp_path / "answers.csv", index=False)
    result = CliRunner().invoke(app, ["study", "analyse", "--study", str(run / "study"),
                                      "--answers-csv", str(tmp_path / "answers.csv")])
    assert result.exit_code == 0, result.output
    assert (run / "study" / "analysis" / "summary.json").is_file()
    result = CliRunner().invoke(app, ["study", "make", "--run", str(run),
                                      "--samples-per-class", "3"])
    assert result.exit_code == 2
    assert "samples_per_class: 2 -> 3" in " ".join(result.output.split())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="chromium and chromedriver are not installed on this machine")
def test_served_form_in_headless_chromium_saves_every_answer_once(server, study_2d):
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    links, database = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    wait = WebDriverWait(driver, 20)
    ready = "return document.body.dataset.ready === 'true'"
    saved = "return document.querySelectorAll('select.saved').length"
    try:
        driver.get(links["ada"])
        wait.until(lambda d: d.execute_script(ready))
        selects = driver.find_elements(By.CSS_SELECTOR, "select[data-image]")
        expected = {}
        for number, element in enumerate(selects[: len(selects) // 2]):
            score = number % 9 - 4
            Select(element).select_by_value(str(score))
            expected[(element.get_attribute("data-image"),
                      element.get_attribute("data-criterion"))] = score
        wait.until(lambda d: d.execute_script(saved) == len(expected))
        Select(selects[0]).select_by_value("4")  # a changed answer replaces its row
        key0 = (selects[0].get_attribute("data-image"), selects[0].get_attribute("data-criterion"))
        expected[key0] = 4
        wait.until(lambda d: d.execute_script(
            "return document.querySelectorAll('select.saved').length") == len(expected))
        driver.refresh()  # mid-way: the answers given so far come back from the database
        wait.until(lambda d: d.execute_script(ready))
        selects = driver.find_elements(By.CSS_SELECTOR, "select[data-image]")
        assert driver.execute_script(saved) == len(expected)
        assert Select(selects[0]).first_selected_option.get_attribute("value") == "4"
        for number, element in enumerate(selects[len(selects) // 2:]):
            score = (number * 5) % 9 - 4
            Select(element).select_by_value(str(score))
            expected[(element.get_attribute("data-image"),
                      element.get_attribute("data-criterion"))] = score
        wait.until(lambda d: d.execute_script(saved) == len(selects))
    finally:
        driver.quit()
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT rater, image, criterion, score FROM answers").fetchall()
    assert len(rows) == len(selects) == 12 * 4 * 3
    assert {(image, criterion): score for _, image, criterion, score in rows} == expected
    assert {rater for rater, *_ in rows} == {"ada"}
