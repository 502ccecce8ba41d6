"""DuckDB over a run's Parquet: the `cells`, `slides` and `patients` views, and the screening rules.

Patient indicators use red cells that do not touch the image edge: a cut cell's size and shape
are not its own (it would read as a small fragment).

Only committed slides are visible: `slides` holds their commit records, and `cells` keeps the
rows of those slides alone, so a query during or after a killed run never sees half a slide.
Screening thresholds live in `ScreeningRules`, the one place to change them (or a YAML file
given with --rules).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import duckdb
import pyarrow as pa
import yaml

from rbcbatch.sinks import MANIFEST_FIELDS, RunStore, cells_schema
from rbcbatch.storage import explains_storage_errors, resolve_options

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


def _pct(condition: str) -> str:
    return f"100.0 * avg(CASE WHEN {condition} THEN 1.0 ELSE 0.0 END)"


def patients_sql(rules: ScreeningRules) -> str:
    """SQL of the `patients` view: indicators per patient from RBC rows, then the flags."""
    poik = ", ".join(f"'{c}'" for c in POIKILOCYTE_CLASSES)
    r = rules
    return f"""
    WITH people AS (
        SELECT cohort, patient_id, any_value(site) AS site, any_value(label) AS label,
               count(*) AS n_slides
        FROM slides GROUP BY cohort, patient_id
    ), rbc AS (
        SELECT cohort, patient_id,
               count(*) AS n_rbc,
               {_pct("class = 'spherocyte'")} AS spherocyte_pct,
               {_pct("class = 'microcyte'")} AS microcyte_pct,
               {_pct("class = 'macrocyte'")} AS macrocyte_pct,
               {_pct("class = 'hypochromic'")} AS hypochromic_pct,
               {_pct("class = 'elliptocyte'")} AS elliptocyte_pct,
               {_pct("class = 'target'")} AS target_pct,
               {_pct("class = 'schistocyte'")} AS schistocyte_pct,
               {_pct(f"class IN ({poik})")} AS poikilocyte_pct,
               avg(diameter_um) AS diameter_mean_um,
               stddev_samp(diameter_um) AS diameter_sd_um,
               100.0 * stddev_samp(diameter_um) / avg(diameter_um) AS diameter_cv_pct
        FROM cells WHERE kind = 'rbc' AND NOT touches_edge GROUP BY cohort, patient_id
    ), joined AS (
        SELECT p.cohort, p.patient_id, p.site, p.label, p.n_slides,
               coalesce(r.n_rbc, 0) AS n_rbc,
               r.* EXCLUDE (cohort, patient_id, n_rbc)
        FROM people p LEFT JOIN rbc r USING (cohort, patient_id)
    )
    SELECT *,
        CASE WHEN n_rbc < {r.min_rbc} THEN 'insufficient'
             WHEN spherocyte_pct >= {r.hs_spherocyte_pct} THEN 'positive'
             ELSE 'negative' END AS hs_flag,
        CASE WHEN n_rbc < {r.min_rbc} THEN 'insufficient'
             WHEN microcyte_pct + hypochromic_pct >= {r.anemia_micro_hypo_pct}
               OR diameter_mean_um < {r.anemia_mean_diameter_um} THEN 'positive'
             ELSE 'negative' END AS anemia_flag
    FROM joined
    ORDER BY cohort, patient_id
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
    run_dir: str, rules: ScreeningRules | None = None, storage_options: dict | None = None
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the run's views: cells, slides, patients."""
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
    con.execute(f"CREATE VIEW patients AS {patients_sql(rules or ScreeningRules())}")
    return con


@explains_storage_errors("run_dir")
def query(
    run_dir: str, sql: str, rules: ScreeningRules | None = None, storage_options: dict | None = None
) -> pa.Table:
    """Run SQL over the views and return an Arrow table."""
    con = connect(run_dir, rules, storage_options)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()
