"""DuckDB over a run's Parquet: the `cells`, `slides`, `sites` and `patients` views, and the
screening rules.

Patient indicators use red cells that do not touch the image edge: a cut cell's size and shape
are not its own (it would read as a small fragment). Every class share comes with its Wilson 95%
score interval (a DuckDB macro, `wilson_lo`/`wilson_hi`; `wilson_interval` is the same formula
in Python), a grade from a grading scheme (rbcbatch.analytics.grading: YAML data turned into SQL CASEs),
and each screening flag with its rule and its evidence (a JSON document: the indicators, their
values, intervals and thresholds, and CBC values from the catalog where there are any).

Only committed slides are visible: `slides` holds their commit records, and `cells` keeps the
rows of those slides alone, so a query during or after a killed run never sees half a slide.
Screening thresholds live in `ScreeningRules`, the one place to change them (or a YAML file
given with --rules).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import duckdb
import pyarrow as pa
import yaml

from rbcbatch.analytics.grading import GRADED_FEATURES, REPORT_CLASSES, GradingScheme, load_scheme
from rbcbatch.io.storage import explains_storage_errors, resolve_options
from rbcbatch.store.run_store import RunStore
from rbcbatch.store.schema import MANIFEST_FIELDS, cells_schema

# Red-cell classes counted as poikilocytes (abnormal shape), after ICSH 2015 (Palmer et al.).
POIKILOCYTE_CLASSES = (
    "spherocyte",
    "elliptocyte",
    "ovalocyte",
    "target",
    "schistocyte",
    "stomatocyte",
    "teardrop",
    "burr",
    "other",
)


@dataclass(frozen=True)
class ScreeningRules:
    """Thresholds of the screening flags, in one place.

    Values are conservative starting points for a screening (not diagnostic) tool and should be
    set per laboratory against its own reference cohort.
    """

    # Below this many red cells a patient's percentages are too uncertain to flag
    # (a 200-cell differential is the usual manual minimum).
    min_rbc: int = 200
    # HS: spherocytes are graded "moderate" from about 5-10% of red cells (ICSH 2015 grading);
    # 10% keeps the flag specific.
    hs_spherocyte_pct: float = 10.0
    # Anemia (microcytic/hypochromic pattern): share of microcytes + hypochromic cells ...
    anemia_micro_hypo_pct: float = 20.0
    # ... or a mean red-cell diameter below the normal range's lower end (6.7-7.5 µm is typical
    # on dried smears; Bessis).
    anemia_mean_diameter_um: float = 6.7
    # Supporting evidence from a CBC in the catalog (never the decision itself): an MCHC above
    # the reference range's upper end (~36 g/dL) is typical of HS (dehydrated spherocytes) ...
    hs_mchc_g_dl: float = 36.0
    # ... and haemoglobin below 12 g/dL is anemia by the WHO cut-off for non-pregnant adult
    # women (13 for men; the catalog carries no sex, so the lower one).
    anemia_hb_g_dl: float = 12.0

    def __post_init__(self) -> None:
        if self.min_rbc < 1:
            raise ValueError("min_rbc must be at least 1")
        for f in fields(self):
            if f.name != "min_rbc" and not 0 < float(getattr(self, f.name)) < 1000:
                raise ValueError(
                    f"{f.name} must be a positive number, got {getattr(self, f.name)!r}"
                )

    @classmethod
    def from_yaml(cls, path: str) -> ScreeningRules:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown screening rule(s) {sorted(unknown)} in {path}; known: {[f.name for f in fields(cls)]}"
            )
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


# z of a two-sided 95% interval: the standard normal's 0.975 quantile.
Z95 = 1.959963984540054

# Shares reported per patient and site, with their counts: every class, then all poikilocytes.
SHARES: tuple[str, ...] = (*REPORT_CLASSES, "poikilocyte")

# The Wilson score interval of k successes in n as DuckDB macros (fractions; NULL when n is 0).
# Unlike p ± z·SE it stays inside [0, 1] and is not empty at 0 or n; the clamp only removes
# rounding below 0 or above 1.
WILSON_MACROS = f"""
CREATE OR REPLACE MACRO wilson_centre(k, n) AS
    (k::DOUBLE / n + {Z95}^2 / (2 * n)) / (1 + {Z95}^2 / n);
CREATE OR REPLACE MACRO wilson_half(k, n) AS
    {Z95} * sqrt((k::DOUBLE / n) * (1 - k::DOUBLE / n) / n + {Z95}^2 / (4 * n * n))
    / (1 + {Z95}^2 / n);
CREATE OR REPLACE MACRO wilson_lo(k, n) AS
    CASE WHEN n > 0 THEN greatest(0.0, wilson_centre(k, n) - wilson_half(k, n)) END;
CREATE OR REPLACE MACRO wilson_hi(k, n) AS
    CASE WHEN n > 0 THEN least(1.0, wilson_centre(k, n) + wilson_half(k, n)) END;
"""


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float | None, float | None]:
    """Wilson score interval of the proportion k/n, as fractions; (None, None) when n is 0."""
    if n <= 0:
        return None, None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _class_counts(column: str = "class") -> str:
    """count(*) per share over red-cell rows: n_spherocyte, ..., n_poikilocyte."""
    poik = ", ".join(f"'{c}'" for c in POIKILOCYTE_CLASSES)
    counts = [f"count(*) FILTER (WHERE {column} = '{c}') AS n_{c}" for c in REPORT_CLASSES]
    counts.append(f"count(*) FILTER (WHERE {column} IN ({poik})) AS n_poikilocyte")
    return ",\n               ".join(counts)


def _share_columns(total: str = "n_rbc") -> str:
    """x_pct, x_pct_lo, x_pct_hi per share (% of `total`, Wilson 95%), from n_x counts."""
    return ",\n        ".join(
        f"100.0 * n_{s} / nullif({total}, 0) AS {s}_pct, "
        f"100.0 * wilson_lo(n_{s}, {total}) AS {s}_pct_lo, "
        f"100.0 * wilson_hi(n_{s}, {total}) AS {s}_pct_hi"
        for s in SHARES
    )


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def hs_rule_text(r: ScreeningRules) -> str:
    return (
        f"positive when spherocyte_pct >= {r.hs_spherocyte_pct:g}; insufficient below "
        f"{r.min_rbc} red cells (cells touching the image edge left out); "
        f"CBC support: MCHC > {r.hs_mchc_g_dl:g} g/dL"
    )


def anemia_rule_text(r: ScreeningRules) -> str:
    return (
        f"positive when microcyte_pct + hypochromic_pct >= {r.anemia_micro_hypo_pct:g} or "
        f"diameter_mean_um < {r.anemia_mean_diameter_um:g}; insufficient below {r.min_rbc} red "
        f"cells (cells touching the image edge left out); CBC support: Hb < "
        f"{r.anemia_hb_g_dl:g} g/dL"
    )


def _criterion(name: str, value: str, lo: str, hi: str, op: str, threshold: float, **extra) -> str:
    """One criterion of a flag as a JSON object: indicator, value, 95% interval, threshold, met."""
    t = float(threshold)
    more = "".join(f", '{k}', {v}" for k, v in extra.items())
    return (
        f"json_object('indicator', '{name}', 'value', round({value}, 3), "
        f"'ci95', json_array(round({lo}, 3), round({hi}, 3)){more}, "
        f"'op', '{op}', 'threshold', {t!r}, 'met', {value} {op} {t!r}, "
        f"'ci95_spans_threshold', {lo} < {t!r} AND {hi} > {t!r})"
    )


def _support(name: str, op: str, threshold: float) -> str:
    """One CBC value as supporting evidence (null where the catalog gives none)."""
    t = float(threshold)
    return (
        f"json_object('indicator', '{name}', 'value', round({name}, 3), 'op', '{op}', "
        f"'threshold', {t!r}, 'met', {name} {op} {t!r})"
    )


def _grade_columns(scheme: GradingScheme, min_rbc: int) -> str:
    """<feature>_grade per gradeable feature: the scheme's CASE, NULL where it has no cut-offs
    for the feature or the patient has too few red cells to grade."""
    columns = [f"{_sql_text(scheme.name)} AS grading_scheme"]
    for feature, column in GRADED_FEATURES.items():
        case = scheme.case_sql(feature, column)
        grade = f"CASE WHEN n_rbc >= {min_rbc} THEN {case} END" if case else "NULL::VARCHAR"
        columns.append(f"{grade} AS {feature}_grade")
    return ",\n        ".join(columns)


def patients_sql(rules: ScreeningRules, scheme: GradingScheme | None = None) -> str:
    """SQL of the `patients` view: indicators per patient from RBC rows, grades, then the flags
    with their rules and evidence. Needs the Wilson macros (WILSON_MACROS)."""
    r = rules
    scheme = load_scheme(scheme)
    micro_hypo = "n_microcyte + n_hypochromic"
    # 95% interval of the mean diameter (normal approximation; n is hundreds of cells).
    mean_lo = f"diameter_mean_um - {Z95} * diameter_sd_um / sqrt(n_rbc)"
    mean_hi = f"diameter_mean_um + {Z95} * diameter_sd_um / sqrt(n_rbc)"
    hs_criteria = _criterion(
        "spherocyte_pct",
        "spherocyte_pct",
        "spherocyte_pct_lo",
        "spherocyte_pct_hi",
        ">=",
        r.hs_spherocyte_pct,
        cells="n_spherocyte",
    )
    anemia_criteria = ", ".join(
        [
            _criterion(
                "microcyte_pct + hypochromic_pct",
                "micro_hypo_pct",
                f"100.0 * wilson_lo({micro_hypo}, n_rbc)",
                f"100.0 * wilson_hi({micro_hypo}, n_rbc)",
                ">=",
                r.anemia_micro_hypo_pct,
                cells=micro_hypo,
            ),
            _criterion(
                "diameter_mean_um",
                "diameter_mean_um",
                mean_lo,
                mean_hi,
                "<",
                r.anemia_mean_diameter_um,
            ),
        ]
    )
    insufficient = f"n_rbc < {r.min_rbc}"

    def evidence(flag: str, criteria: str, support: str, grades: str) -> str:
        return (
            f"json_object('decision', {flag}, 'n_rbc', n_rbc, 'min_rbc', {r.min_rbc}, "
            f"'positive_when', 'any criterion is met', 'criteria', json_array({criteria}), "
            f"'cbc_support', json_array({support}), "
            f"'grades', json_object('scheme', grading_scheme, {grades}))::VARCHAR"
        )

    return f"""
    WITH people AS (
        SELECT cohort, patient_id, any_value(site) AS site, any_value(label) AS label,
               count(*) AS n_slides,
               avg(hb_g_dl) AS hb_g_dl, avg(mchc_g_dl) AS mchc_g_dl, avg(rdw_pct) AS rdw_pct
        FROM slides GROUP BY cohort, patient_id
    ), rbc AS (
        SELECT cohort, patient_id,
               count(*) AS n_rbc,
               {_class_counts()},
               avg(diameter_um) AS diameter_mean_um,
               stddev_samp(diameter_um) AS diameter_sd_um
        FROM cells WHERE kind = 'rbc' AND NOT touches_edge GROUP BY cohort, patient_id
    ), joined AS (
        SELECT p.*, coalesce(r.n_rbc, 0) AS n_rbc,
               {", ".join(f"coalesce(r.n_{s}, 0) AS n_{s}" for s in SHARES)},
               r.diameter_mean_um, r.diameter_sd_um
        FROM people p LEFT JOIN rbc r USING (cohort, patient_id)
    ), indicators AS (
        SELECT *,
        {_share_columns()},
        100.0 * diameter_sd_um / diameter_mean_um AS diameter_cv_pct,
        100.0 * ({micro_hypo}) / nullif(n_rbc, 0) AS micro_hypo_pct
        FROM joined
    ), graded AS (
        SELECT *,
        {_grade_columns(scheme, r.min_rbc)},
        CASE WHEN {insufficient} THEN 'insufficient'
             WHEN spherocyte_pct >= {r.hs_spherocyte_pct!r} THEN 'positive'
             ELSE 'negative' END AS hs_flag,
        CASE WHEN {insufficient} THEN 'insufficient'
             WHEN micro_hypo_pct >= {r.anemia_micro_hypo_pct!r}
               OR diameter_mean_um < {r.anemia_mean_diameter_um!r} THEN 'positive'
             ELSE 'negative' END AS anemia_flag
        FROM indicators
    )
    SELECT cohort, patient_id, site, label, n_slides, n_rbc,
        {", ".join(f"{s}_pct, {s}_pct_lo, {s}_pct_hi" for s in SHARES)},
        diameter_mean_um, diameter_sd_um, diameter_cv_pct,
        {", ".join(f"n_{s}" for s in SHARES)},
        hb_g_dl, mchc_g_dl, rdw_pct,
        grading_scheme, {", ".join(f"{f}_grade" for f in GRADED_FEATURES)},
        hs_flag,
        {_sql_text(hs_rule_text(r))} AS hs_rule,
        {
        evidence(
            "hs_flag",
            hs_criteria,
            _support("mchc_g_dl", ">", r.hs_mchc_g_dl),
            "'spherocyte', spherocyte_grade",
        )
    } AS hs_evidence,
        mchc_g_dl > {float(r.hs_mchc_g_dl)!r} AS hs_supported_by_cbc,
        anemia_flag,
        {_sql_text(anemia_rule_text(r))} AS anemia_rule,
        {
        evidence(
            "anemia_flag",
            anemia_criteria,
            _support("hb_g_dl", "<", r.anemia_hb_g_dl),
            "'microcyte', microcyte_grade, 'hypochromic', hypochromic_grade",
        )
    }
            AS anemia_evidence,
        hb_g_dl < {float(r.anemia_hb_g_dl)!r} AS anemia_supported_by_cbc
    FROM graded
    ORDER BY cohort, patient_id
    """


def sites_sql() -> str:
    """SQL of the `sites` view: per site, scanner and stain, how many slides, patients and cells,
    the mean red-cell diameter and the class mix (red cells not touching the image edge)."""
    return f"""
    WITH per_slide AS (
        SELECT slide_id, count(*) AS n_rbc, sum(diameter_um) AS diameter_sum_um,
               {_class_counts()}
        FROM cells WHERE kind = 'rbc' AND NOT touches_edge GROUP BY slide_id
    ), joined AS (
        SELECT s.site, s.scanner, s.stain,
               count(*) AS n_slides,
               count(DISTINCT (s.cohort, s.patient_id)) AS n_patients,
               sum(s.n_objects)::BIGINT AS n_objects,
               coalesce(sum(c.n_rbc), 0)::BIGINT AS n_rbc,
               sum(c.diameter_sum_um) / nullif(sum(c.n_rbc), 0) AS diameter_mean_um,
               {", ".join(f"coalesce(sum(c.n_{x}), 0)::BIGINT AS n_{x}" for x in SHARES)}
        FROM slides s LEFT JOIN per_slide c USING (slide_id)
        GROUP BY s.site, s.scanner, s.stain
    )
    SELECT site, scanner, stain, n_slides, n_patients, n_objects, n_rbc, diameter_mean_um,
        {", ".join(f"100.0 * n_{x} / nullif(n_rbc, 0) AS {x}_pct" for x in SHARES)}
    FROM joined
    ORDER BY site, scanner, stain
    """


def _empty_table(fields_: dict | pa.Schema) -> pa.Table:
    """An empty table of this schema that DuckDB can register (it reads no Arrow float16)."""
    schema = fields_ if isinstance(fields_, pa.Schema) else pa.schema(list(fields_.items()))
    half = pa.list_(pa.float16())
    return pa.schema(
        [f.with_type(pa.list_(pa.float32())) if f.type == half else f for f in schema]
    ).empty_table()


@explains_storage_errors("run_dir")
def connect(
    run_dir: str,
    rules: ScreeningRules | None = None,
    storage_options: dict | None = None,
    grading: str | GradingScheme | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views: cells, slides, sites, patients.

    grading: a shipped grading scheme's name (icsh2015, the default, or cap_simple) or the path
    of a scheme YAML file.
    """
    scheme = load_scheme(grading)
    store = RunStore(run_dir, resolve_options(storage_options, run_dir))
    if not store.fs.exists(store.path("run.json")):
        raise FileNotFoundError(
            f"{run_dir} is not an rbcbatch run folder (no run.json); run `rbcbatch run` first"
        )
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    if "://" in store.url:
        con.register_filesystem(store.fs)
    records = store.read_records("_slides")
    slides = (
        pa.Table.from_pylist(records, schema=pa.schema(list(MANIFEST_FIELDS.items())))
        if records
        else _empty_table(MANIFEST_FIELDS)
    )
    con.register("slides_records", slides)
    con.execute("CREATE VIEW slides AS SELECT * FROM slides_records")
    cell_files = store.fs.glob(store.path("cells", "**", "*.parquet"))
    if cell_files:
        glob = f"{store.url}/cells/**/*.parquet"
        con.execute(
            f"""CREATE VIEW cells AS
                SELECT c.* FROM read_parquet('{glob}', hive_partitioning = true) c
                SEMI JOIN slides s ON c.slide_id = s.slide_id AND c.run_id = s.run_id"""
        )
    else:
        con.register("cells_empty", _empty_table(cells_schema()))
        con.execute("CREATE VIEW cells AS SELECT * FROM cells_empty")
    con.execute(WILSON_MACROS)
    con.execute(f"CREATE VIEW sites AS {sites_sql()}")
    con.execute(f"CREATE VIEW patients AS {patients_sql(rules or ScreeningRules(), scheme)}")
    return con


@explains_storage_errors("run_dir")
def query(
    run_dir: str,
    sql: str,
    rules: ScreeningRules | None = None,
    storage_options: dict | None = None,
    grading: str | GradingScheme | None = None,
) -> pa.Table:
    """Run SQL over the views and return an Arrow table."""
    con = connect(run_dir, rules, storage_options, grading)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()
