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
from pathlib import Path

import duckdb
import pyarrow as pa
import yaml

from rbcbatch.analytics.grading import GRADED_FEATURES, REPORT_CLASSES, GradingScheme, load_scheme
from rbcbatch.io.storage import explains_storage_errors, resolve_options
from rbcbatch.store.run_store import RunStore
from rbcbatch.store.schema import MANIFEST_FIELDS, cells_schema

# Red-cell classes counted as poikilocytes (abnormal shape), after ICSH 2015 (Palmer et al.).
SQL_DIR = Path(__file__).parent / "sql"


def sql_template(name: str) -> str:
    """The text of sql/<name>.sql: a view's SQL with {fields} that the caller fills in."""
    return (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")


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

# The Wilson score interval as DuckDB macros wilson_lo(k, n) and wilson_hi(k, n) (sql/wilson.sql).
WILSON_MACROS = sql_template("wilson").format(z=Z95)


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
            f"'grades', json_object('scheme', grading_scheme, {grades}), "
            # µm measures rest on the pixel size: say where the patient's slides got theirs
            "'um_per_px', json_object('sources', um_per_px_sources, 'estimated', "
            "coalesce(list_contains(um_per_px_sources, 'estimated'), false)))::VARCHAR"
        )

    return sql_template("patients").format(
        class_counts=_class_counts(),
        share_counts=", ".join(f"coalesce(r.n_{s}, 0) AS n_{s}" for s in SHARES),
        share_columns=_share_columns(),
        micro_hypo=micro_hypo,
        grade_columns=_grade_columns(scheme, r.min_rbc),
        insufficient=insufficient,
        hs_spherocyte_pct=repr(r.hs_spherocyte_pct),
        anemia_micro_hypo_pct=repr(r.anemia_micro_hypo_pct),
        anemia_mean_diameter_um=repr(r.anemia_mean_diameter_um),
        share_outputs=", ".join(f"{s}_pct, {s}_pct_lo, {s}_pct_hi" for s in SHARES),
        share_count_outputs=", ".join(f"n_{s}" for s in SHARES),
        grade_outputs=", ".join(f"{f}_grade" for f in GRADED_FEATURES),
        hs_rule=_sql_text(hs_rule_text(r)),
        hs_evidence=evidence(
            "hs_flag",
            hs_criteria,
            _support("mchc_g_dl", ">", r.hs_mchc_g_dl),
            "'spherocyte', spherocyte_grade",
        ),
        hs_mchc_g_dl=repr(float(r.hs_mchc_g_dl)),
        anemia_rule=_sql_text(anemia_rule_text(r)),
        anemia_evidence=evidence(
            "anemia_flag",
            anemia_criteria,
            _support("hb_g_dl", "<", r.anemia_hb_g_dl),
            "'microcyte', microcyte_grade, 'hypochromic', hypochromic_grade",
        ),
        anemia_hb_g_dl=repr(float(r.anemia_hb_g_dl)),
    )


def sites_sql() -> str:
    """SQL of the `sites` view: per site, scanner and stain, how many slides, patients and cells,
    the mean red-cell diameter and the class mix (red cells not touching the image edge)."""
    return sql_template("sites").format(
        class_counts=_class_counts(),
        share_sums=", ".join(f"coalesce(sum(c.n_{x}), 0)::BIGINT AS n_{x}" for x in SHARES),
        share_pcts=", ".join(f"100.0 * n_{x} / nullif(n_rbc, 0) AS {x}_pct" for x in SHARES),
    )


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
        # Every file carries its cohort and patient_id: patients' files, slides' own files not
        # yet folded in, and the cohort=/patient_id= folders of older runs alike.
        glob = f"{store.url}/cells/**/*.parquet"
        con.execute(
            f"""CREATE VIEW cells AS
                SELECT c.* FROM read_parquet('{glob}', hive_partitioning = false) c
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
