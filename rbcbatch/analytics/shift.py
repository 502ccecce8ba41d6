"""Dataset shift: how far each site's red cells are from a reference site's, from a run's Parquet.

A detector trained on one laboratory's smears loses recall on another's when the images differ
(stain, scanner, optics). This module asks whether a group of slides (a site, a scanner or a
cohort) looks different from a reference group, using only the cell rows a run stored: the 64-d
embedding of the learned classifier (`--classifier resnet`) and the colour measures of
`rbcbatch.measure` (mean R, G, B and optical density).

The score is a classifier two-sample test: a linear classifier (ridge, i.e. regularised
least squares on 0/1 labels) on standardised features is asked, by cross-validation, to tell a
group's cells from the reference's. Its cross-validated ROC AUC is 0.5 when the two are
indistinguishable and near 1 when they are apart. Choices that keep the score about the images
rather than the patients:

- Morphology mix. Only cells of the same predicted classes are compared, in the same numbers per
  class on both sides (by default only cells called `normal`, the class every site has in
  quantity). A site with more HS patients has more spherocytes, which look unlike normal cells in
  any feature; comparing normal-called cells with normal-called cells keeps that out of the score.
  Matching counts per class (rather than weighting) keeps the samples plain and the permutation
  test exact; `classes=None` matches the share of every class instead of using normal cells only.
- Patients. Each side is sampled taking turns over its patients, so one patient with many cells
  cannot dominate, and the cross-validation folds hold out whole patients (slides, then cells,
  when a side has fewer than two patients): the classifier must recognise the group in patients
  it never saw, not memorise each patient's slides. (With few patients this pushes the AUC of
  an unshifted group below 0.5: a held-out patient is unlike the training mean of its own side.
  Below 0.5 reads as "no shift".)
- Significance. A permutation p-value: the group/reference labels of the sampled cells are
  shuffled a fixed number of times (seeded) and the whole cross-validation is redone each time;
  p = (1 + #{permuted AUC >= observed}) / (1 + permutations). Cells of one patient are not
  independent, so with few patients this p is optimistic; the AUC threshold of the flag is what
  keeps ordinary patient-to-patient variation from being called a shift.

A group is flagged out of distribution when its AUC is at least `auc_threshold` and its p-value
is below `alpha`. The maximum mean discrepancy (MMD, Gaussian kernel, median-distance bandwidth)
of the same samples, with its own permutation p-value, is reported beside it as a second,
model-free measure; it does not enter the flag.

A t-SNE map of a seeded subsample of red cells of every class (a few thousand at most, taken in
equal numbers per group and turns over patients) shows the groups and the classes side by side.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rbcbatch.errors import RbcbatchError

GROUP_COLUMNS = ("site", "scanner", "cohort")
FEATURE_SETS = ("all", "embedding", "colour")
# Colour measures stored per cell by rbcbatch.measure (CELL_MEASURES).
COLOUR_COLUMNS = ("mean_r", "mean_g", "mean_b", "mean_od")
# Ridge penalty on standardised features (scikit-learn RidgeClassifier's default).
RIDGE_ALPHA = 1.0
# Label of cells whose grouping column is empty (scanner and cohort are optional in a catalog).
NO_VALUE = "(none)"
# Columns of ShiftReport.scores, in order.
SCORE_COLUMNS = [
    "group",
    "n_patients",
    "n_cells",
    "auc",
    "p_value",
    "mmd",
    "mmd_p_value",
    "flagged",
    "cv_by",
]


class ShiftError(RbcbatchError):
    """A shift analysis cannot be done on this run as asked; the message says what to change."""


@dataclass(frozen=True)
class ShiftSettings:
    """What the analysis compares and when it flags; defaults are stated here only."""

    # Predicted classes compared (same count per class on both sides); None: every class.
    classes: tuple[str, ...] | None = ("normal",)
    # Most cells per side in a comparison, and the fewest a side may have (below it an AUC over
    # a few dozen cells swings by +-0.1 from sampling alone).
    max_cells: int = 400
    min_cells: int = 50
    folds: int = 5
    # 200 permutations resolve p down to 1/201 ~ 0.005, well under alpha = 0.05.
    n_permutations: int = 200
    # AUC 0.75: a classifier that ranks a random group cell above a random reference cell three
    # times in four; "acceptable" discrimination starts at 0.7 (Hosmer & Lemeshow).
    auc_threshold: float = 0.75
    alpha: float = 0.05
    # Cells in the t-SNE map (0: no map). 1,500 cells take 5-8 s on one core (openTSNE).
    map_cells: int = 1500

    def __post_init__(self) -> None:
        if self.min_cells < 10:
            raise ValueError(f"min_cells must be at least 10, got {self.min_cells}")
        if self.max_cells < self.min_cells:
            raise ValueError(
                f"max_cells ({self.max_cells}) must be at least min_cells ({self.min_cells})"
            )
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.n_permutations < 1:
            raise ValueError(f"n_permutations must be at least 1, got {self.n_permutations}")
        if not 0.5 <= self.auc_threshold <= 1.0:
            raise ValueError(f"auc_threshold must lie in [0.5, 1], got {self.auc_threshold}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.map_cells < 0:
            raise ValueError(f"map_cells must be 0 or more, got {self.map_cells}")
        if self.classes is not None and not self.classes:
            raise ValueError("classes must name at least one class, or be None for every class")


@dataclass
class ShiftReport:
    """The outcome: one score row per group (the reference left out) and the t-SNE map.

    `scores` columns: group, n_patients, n_cells (per side in the comparison), auc, p_value,
    mmd, mmd_p_value, flagged, cv_by (patient, slide or cell: what the folds held out).
    `map` columns: x, y, group, class, patient_id, slide_id (empty when no map was asked for).
    """

    run_dir: str
    by: str
    reference: str
    features: str
    feature_names: list[str]
    settings: ShiftSettings
    scores: pd.DataFrame
    map: pd.DataFrame = field(default_factory=pd.DataFrame)
    seed: int = 0

    @property
    def flagged(self) -> list[str]:
        return self.scores.loc[self.scores["flagged"], "group"].tolist()


def parse_classes(text: str) -> tuple[str, ...] | None:
    """'normal' or 'normal,target' -> a tuple of class names; 'all' -> None (every class)."""
    if text.strip().lower() == "all":
        return None
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise ValueError("--classes names no class; give e.g. normal, or all")
    return names


# -- reading -------------------------------------------------------------------------------------
def cell_features_sql(by: str) -> str:
    """Red cells not cut by the image edge, with their group, provenance and features."""
    colour = ", ".join(COLOUR_COLUMNS)
    return f"""
        SELECT coalesce(CAST({by} AS VARCHAR), '{NO_VALUE}') AS "group", patient_id, slide_id,
               cell_id, class, {colour}, embedding
        FROM cells WHERE kind = 'rbc' AND NOT touches_edge
        ORDER BY slide_id, cell_id
    """


def read_cell_features(
    run_dir: str, by: str = "site", features: str = "all", storage_options: dict | None = None
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """The run's red cells: a table (group, patient_id, slide_id, cell_id, class) and features.

    Returns (cells, X float64 (n_cells, n_features), feature names). Rows are in slide and cell
    order so that seeded samples are the same on every read.
    """
    from rbcbatch.analytics import connect

    if by not in GROUP_COLUMNS:
        raise ShiftError(f"cannot group by {by!r}; choose one of {', '.join(GROUP_COLUMNS)}")
    if features not in FEATURE_SETS:
        raise ShiftError(f"unknown feature set {features!r}; choose one of {FEATURE_SETS}")
    try:
        con = connect(run_dir, storage_options=storage_options)
    except FileNotFoundError as e:
        raise ShiftError(str(e)) from e
    try:
        table = con.sql(cell_features_sql(by)).to_arrow_table()
    finally:
        con.close()
    if table.num_rows == 0:
        raise ShiftError(
            f"{run_dir} has no committed red cells (away from the image edge) to compare"
        )
    cells = table.select(["group", "patient_id", "slide_id", "cell_id", "class"]).to_pandas()
    blocks, names = [], []
    if features in ("all", "embedding"):
        embedding = _embedding_matrix(table["embedding"], run_dir)
        blocks.append(embedding)
        names += [f"embedding_{i}" for i in range(embedding.shape[1])]
    if features in ("all", "colour"):
        blocks.append(np.column_stack([table[c].to_numpy() for c in COLOUR_COLUMNS]))
        names += list(COLOUR_COLUMNS)
    X = np.hstack(blocks).astype(np.float64)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():  # a cell with no colour (empty mask) carries nothing to compare
        cells, X = cells[~bad].reset_index(drop=True), X[~bad]
    return cells, X, names


def _embedding_matrix(column, run_dir: str) -> np.ndarray:
    """(n, 64) float from the list column; a clear error when the run stored none."""
    if column.null_count:
        advice = (
            "re-run it with `--classifier resnet` (which stores a 64-d embedding per red cell), "
            "or compare colour measures only with `--features colour`"
        )
        if column.null_count == len(column):
            raise ShiftError(
                f"{run_dir} has no cell embeddings (it was made with the rules classifier); "
                + advice
            )
        raise ShiftError(
            f"{run_dir}: {column.null_count} of {len(column)} red cells have no embedding; "
            + advice
        )
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), -1)


# -- sampling ------------------------------------------------------------------------------------
def balanced_sample(patient_ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `n` rows taken in turns over patients (random order within each patient).

    A patient with 500 cells gives no more than one with 50 until the 50 are used up, so no
    single patient dominates a sample.
    """
    patient_ids = np.asarray(patient_ids)
    if n > len(patient_ids):
        raise ValueError(f"cannot sample {n} rows from {len(patient_ids)}")
    ranks = np.empty(len(patient_ids), dtype=np.int64)
    turn = np.empty(len(patient_ids), dtype=np.int64)
    patients = np.unique(patient_ids)
    for position, p in enumerate(rng.permutation(patients)):
        rows = np.flatnonzero(patient_ids == p)
        ranks[rng.permutation(rows)] = np.arange(len(rows))
        turn[rows] = position
    order = np.lexsort((turn, ranks))  # by rank within patient, then patient's turn
    return np.sort(order[:n])


def matched_pair(
    cells: pd.DataFrame,
    group: str,
    reference: str,
    classes: tuple[str, ...] | None,
    max_cells: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of a group and the reference with the same number of cells of each class.

    Per class the smaller side's count is taken (scaled down together so a side holds at most
    `max_cells`); each side is then sampled in turns over its patients.
    """
    in_group = cells["group"].to_numpy() == group
    in_ref = cells["group"].to_numpy() == reference
    cls = cells["class"].to_numpy()
    wanted = sorted(set(cls[in_group]) | set(cls[in_ref])) if classes is None else list(classes)
    counts = {c: min((in_group & (cls == c)).sum(), (in_ref & (cls == c)).sum()) for c in wanted}
    total = sum(counts.values())
    scale = min(1.0, max_cells / total) if total else 0.0
    take = {c: int(np.floor(k * scale)) for c, k in counts.items()}
    patients = cells["patient_id"].to_numpy()
    picked = ([], [])
    for c, k in take.items():
        if k == 0:
            continue
        for side, mask in enumerate((in_group, in_ref)):
            rows = np.flatnonzero(mask & (cls == c))
            picked[side].append(rows[balanced_sample(patients[rows], k, rng)])
    return tuple(np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in picked)


# -- the two-sample tests ------------------------------------------------------------------------
def cv_units(patients: np.ndarray, slides: np.ndarray, y: np.ndarray) -> tuple[str, np.ndarray]:
    """What the folds hold out: patients if each side has two or more, else slides, else cells."""
    for name, units in (("patient", patients), ("slide", slides)):
        if min(len(np.unique(units[y == 0])), len(np.unique(units[y == 1]))) >= 2:
            return name, units
    return "cell", np.arange(len(y))


def unit_folds(
    units: np.ndarray, y: np.ndarray, folds: int, rng: np.random.Generator
) -> np.ndarray:
    """Fold number per row: each side's units dealt out in turns, so every fold holds both sides.

    A unit (patient, slide) lies in one fold only. There are min(folds, units of the smaller
    side) folds.
    """
    k = min(folds, len(np.unique(units[y == 0])), len(np.unique(units[y == 1])))
    fold = np.empty(len(y), dtype=np.int64)
    for side in (0, 1):
        side_units = rng.permutation(np.unique(units[y == side]))
        for i, unit in enumerate(side_units):
            fold[(units == unit) & (y == side)] = i % k
    return fold


def ridge_auc(X: np.ndarray, labels: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Cross-validated ROC AUC of a ridge (least-squares) classifier, for each row of `labels`.

    X float (n, d); labels 0/1 of shape (k, n), one labelling per row (the observed one and its
    permutations); fold (n,) from `unit_folds`. Features are standardised on each fold's training
    rows. The AUC counts pairs of cells held out in the same fold (sum of the folds' Mann-Whitney
    U over the sum of their pairs), so folds whose training sets differ in balance (and so in
    intercept) are never ranked against each other. A least-squares linear classifier is the
    regularised form of Fisher's discriminant; its weights are one linear solve per fold for
    every labelling at once, which makes a permutation test of a few hundred labellings take
    well under a second.
    """
    labels = np.atleast_2d(labels).astype(np.float64)
    wins = np.zeros(len(labels))
    pairs = np.zeros(len(labels))
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        mean, sd = X[train].mean(axis=0), X[train].std(axis=0)
        sd[sd == 0] = 1.0
        A, B = (X[train] - mean) / sd, (X[test] - mean) / sd
        target = labels[:, train]
        centred = target - target.mean(axis=1, keepdims=True)
        gram = A.T @ A + RIDGE_ALPHA * np.eye(A.shape[1])
        weights = np.linalg.solve(gram, A.T @ centred.T)  # (d, k)
        u, m_n = mann_whitney_rows(labels[:, test], (B @ weights).T)
        wins += u
        pairs += m_n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, 0.5)


def mann_whitney_rows(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: U (pairs where the label-1 cell scores higher, ties half) and m*n, the pairs."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    m = labels.sum(axis=1)
    n = labels.shape[1] - m
    return (ranks * labels).sum(axis=1) - m * (m + 1) / 2.0, m * n


def mmd_rows(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Unbiased MMD² between label-1 and label-0 rows for each labelling (k, n) of X (n, d).

    Gaussian kernel on features standardised over the pooled sample; bandwidth: the median
    pairwise distance (the usual heuristic).
    """
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    norms = (Z**2).sum(axis=1)
    sq = np.maximum(norms[:, None] + norms[None, :] - 2.0 * Z @ Z.T, 0.0)
    bandwidth2 = float(np.median(sq[~np.eye(len(Z), dtype=bool)])) or 1.0
    K = np.exp(-sq / (2.0 * bandwidth2))
    np.fill_diagonal(K, 0.0)
    a = np.atleast_2d(labels).astype(np.float64)
    b = 1.0 - a
    m, n = a.sum(axis=1), b.sum(axis=1)
    Ka, Kb = a @ K, b @ K
    xx = (Ka * a).sum(axis=1) / (m * (m - 1))
    yy = (Kb * b).sum(axis=1) / (n * (n - 1))
    xy = (Ka * b).sum(axis=1) / (m * n)
    return xx + yy - 2.0 * xy


def permutation_p(observed: float, permuted: np.ndarray) -> float:
    """(1 + #{permuted >= observed}) / (1 + permutations): never 0, exact under exchangeability."""
    return (1 + int((permuted >= observed).sum())) / (1 + len(permuted))


def compare(
    X: np.ndarray,
    y: np.ndarray,
    patients: np.ndarray,
    slides: np.ndarray,
    settings: ShiftSettings,
    rng: np.random.Generator,
) -> dict:
    """Both tests for one group (y=1) against the reference (y=0), on the same permutations."""
    cv_by, units = cv_units(patients, slides, y)
    fold = unit_folds(units, y, settings.folds, rng)
    labels = np.vstack([y, [rng.permutation(y) for _ in range(settings.n_permutations)]])
    aucs = ridge_auc(X, labels, fold)
    mmds = mmd_rows(X, labels)
    auc, p_value = float(aucs[0]), permutation_p(aucs[0], aucs[1:])
    return {
        "auc": auc,
        "p_value": p_value,
        "mmd": float(mmds[0]),
        "mmd_p_value": permutation_p(mmds[0], mmds[1:]),
        "flagged": bool(auc >= settings.auc_threshold and p_value < settings.alpha),
        "cv_by": cv_by,
    }


# -- groups and the reference --------------------------------------------------------------------
def choose_reference(cells: pd.DataFrame, by: str, reference: str | None) -> str:
    """The named reference, checked, or the group with the most red cells (ties: by name)."""
    sizes = cells["group"].value_counts()
    groups = sorted(sizes.index)
    if len(groups) < 2:
        only = groups[0] if groups else "none"
        raise ShiftError(
            f"the run has red cells of only one {by} ({only}); a shift analysis compares at "
            f"least two. Group by another column (--by {' / '.join(GROUP_COLUMNS)})"
        )
    if reference is None:
        return sorted(groups, key=lambda g: (-sizes[g], g))[0]
    if reference not in sizes.index:
        raise ShiftError(f"unknown reference {by} {reference!r}; the run has {', '.join(groups)}")
    return reference


def _too_few(cells: pd.DataFrame, group: str, reference: str, by: str, n: int, s) -> ShiftError:
    wanted = "every class" if s.classes is None else "class " + " / ".join(s.classes)
    return ShiftError(
        f"{by} {group!r} against {reference!r}: only {n} red cells of {wanted} can be matched "
        f"per side, fewer than min_cells={s.min_cells}. Lower --min-cells, compare more classes "
        "(--classes all), or leave this group out"
    )


# -- the analysis --------------------------------------------------------------------------------
def shift_analysis(
    run_dir: str,
    by: str = "site",
    reference: str | None = None,
    storage_options: dict | None = None,
    seed: int = 0,
    features: str = "all",
    settings: ShiftSettings | None = None,
) -> ShiftReport:
    """Score every group of a run against a reference group; see the module docstring."""
    settings = settings or ShiftSettings()
    cells, X, names = read_cell_features(run_dir, by, features, storage_options)
    reference = choose_reference(cells, by, reference)
    missing = sorted(set(settings.classes or ()) - set(cells["class"]))
    if missing:
        raise ShiftError(
            f"no red cell of class {', '.join(missing)} in {run_dir}; classes present: "
            f"{', '.join(sorted(set(cells['class'])))}"
        )
    patients = cells["patient_id"].to_numpy()
    slides = cells["slide_id"].to_numpy()
    rows = []
    for position, group in enumerate(sorted(set(cells["group"]) - {reference})):
        rng = np.random.default_rng([seed, position])
        ours, theirs = matched_pair(
            cells, group, reference, settings.classes, settings.max_cells, rng
        )
        if len(ours) < settings.min_cells:
            raise _too_few(cells, group, reference, by, len(ours), settings)
        idx = np.concatenate([ours, theirs])
        y = np.r_[np.ones(len(ours), dtype=np.int64), np.zeros(len(theirs), dtype=np.int64)]
        result = compare(X[idx], y, patients[idx], slides[idx], settings, rng)
        rows.append(
            {
                "group": group,
                "n_patients": int(cells.loc[cells["group"] == group, "patient_id"].nunique()),
                "n_cells": len(ours),
                **result,
            }
        )
    scores = pd.DataFrame(rows, columns=SCORE_COLUMNS)
    tsne = shift_map(cells, X, settings.map_cells, seed)
    return ShiftReport(run_dir, by, reference, features, names, settings, scores, tsne, seed)


# -- the map -------------------------------------------------------------------------------------
def shift_map(cells: pd.DataFrame, X: np.ndarray, n_cells: int, seed: int) -> pd.DataFrame:
    """t-SNE coordinates of a seeded subsample: equal cells per group, in turns over patients."""
    columns = ["x", "y", "group", "class", "patient_id", "slide_id"]
    if n_cells == 0:
        return pd.DataFrame(columns=columns)
    from openTSNE import TSNE

    rng = np.random.default_rng([seed, 1_000_003])
    groups = sorted(set(cells["group"]))
    per_group = max(1, n_cells // len(groups))
    picked = []
    for group in groups:
        rows = np.flatnonzero(cells["group"].to_numpy() == group)
        k = min(per_group, len(rows))
        picked.append(rows[balanced_sample(cells["patient_id"].to_numpy()[rows], k, rng)])
    idx = np.concatenate(picked)
    Z = X[idx]
    Z = (Z - Z.mean(axis=0)) / np.where(Z.std(axis=0) > 0, Z.std(axis=0), 1.0)
    # Perplexity 30 (the usual) where there are enough cells; it must stay under n / 3.
    perplexity = float(min(30.0, max(2.0, (len(idx) - 1) / 3.0)))
    xy = np.asarray(
        TSNE(perplexity=perplexity, initialization="pca", random_state=seed, n_jobs=1).fit(Z)
    )
    out = cells.iloc[idx][["group", "class", "patient_id", "slide_id"]].reset_index(drop=True)
    out.insert(0, "y", xy[:, 1])
    out.insert(0, "x", xy[:, 0])
    return out[columns]


def shift_map_png(report: ShiftReport, dpi: int = 110) -> bytes:
    """The t-SNE map as PNG bytes: cells coloured by group (left) and by predicted class (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.4), dpi=dpi)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    tsne = report.map
    scores = report.scores.set_index("group")
    if tsne.empty:
        for ax in (left, right):
            ax.text(0.5, 0.5, "no map (map_cells = 0)", ha="center", va="center")
            ax.set_axis_off()
    else:
        for ax, column, title in (
            (left, "group", f"by {report.by} (reference: {report.reference})"),
            (right, "class", "by predicted class"),
        ):
            values = sorted(set(tsne[column]))
            cmap = _palette(len(values))
            for i, value in enumerate(values):
                at = tsne[column] == value
                label = value
                if column == "group" and value in scores.index:
                    row = scores.loc[value]
                    mark = ", shifted" if row["flagged"] else ""
                    label = f"{value} (AUC {row['auc']:.2f}{mark})"
                elif column == "group":
                    label = f"{value} (reference)"
                ax.scatter(
                    tsne.loc[at, "x"], tsne.loc[at, "y"], s=6, alpha=0.7, color=cmap[i], label=label
                )
            ax.set_title(title)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.legend(fontsize=7, markerscale=2.5, loc="best", frameon=True)
    fig.suptitle(f"t-SNE of red-cell features ({report.features}), {len(tsne)} cells")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# -- outputs -------------------------------------------------------------------------------------
def write_shift_outputs(
    report: ShiftReport, out: str, storage_options: dict | None = None
) -> list[str]:
    """shift_scores.csv, shift_scores.parquet and shift_map.png into `out` (path or URL)."""
    import fsspec

    from rbcbatch.io.storage import resolve_options

    fs, root = fsspec.core.url_to_fs(out, **resolve_options(storage_options, out))
    fs.makedirs(root, exist_ok=True)
    table = scores_with_settings(report)
    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    files = {
        "shift_scores.csv": table.to_csv(index=False).encode(),
        "shift_scores.parquet": parquet.getvalue(),
        "shift_map.png": shift_map_png(report),
    }
    written = []
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)
        written.append(f"{out.rstrip('/')}/{name}")
    return written


def scores_with_settings(report: ShiftReport) -> pd.DataFrame:
    """The score table with what it was measured against, so a saved file stands on its own."""
    s = report.settings
    table = report.scores.copy()
    table.insert(0, "by", report.by)
    table.insert(2, "reference", report.reference)
    table["features"] = report.features
    table["classes"] = "all" if s.classes is None else ",".join(s.classes)
    table["auc_threshold"] = s.auc_threshold
    table["alpha"] = s.alpha
    table["n_permutations"] = s.n_permutations
    table["seed"] = report.seed
    table["run_dir"] = report.run_dir
    return table
