"""How well a run on a synthetic cohort agrees with its ground truth (used by `rbcbatch demo`)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from rbcbatch.analytics import connect

# Which synthetic conditions each screening flag is scored against. The anemia flag's rule reads
# the microcytic/hypochromic pattern (IDA); HS is a haemolytic anemia too, so it is scored
# against both readings and the table shows each.
FLAG_TRUTH = (("hs_flag", ("hs",)), ("anemia_flag", ("ida",)), ("anemia_flag", ("hs", "ida")))


def flag_agreement(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """Per flag: true/false positives and negatives against the patients' synthetic condition."""
    parts = []
    for flag, conditions in FLAG_TRUTH:
        truth = f"label IN ({', '.join(repr(c) for c in conditions)})"
        parts.append(f"""
            SELECT '{flag}' AS flag, '{" or ".join(conditions)}' AS finds,
                   count(*) FILTER ({flag} = 'positive' AND {truth}) AS tp,
                   count(*) FILTER ({flag} = 'positive' AND NOT {truth}) AS fp,
                   count(*) FILTER ({flag} = 'negative' AND {truth}) AS fn,
                   count(*) FILTER ({flag} = 'negative' AND NOT {truth}) AS tn,
                   count(*) FILTER ({flag} = 'insufficient') AS insufficient,
                   avg(CASE WHEN ({flag} = 'positive') = ({truth}) THEN 1.0 ELSE 0.0 END)
                       FILTER ({flag} <> 'insufficient') AS accuracy
            FROM patients""")
    return con.sql(" UNION ALL ".join(parts)).to_arrow_table()


def count_agreement(con: duckdb.DuckDBPyConnection, truth_path: Path) -> pa.Table:
    """RBC count per slide against the true count: mean absolute and pooled relative error."""
    con.execute("CREATE OR REPLACE TABLE truth AS SELECT * FROM read_parquet(?)", [str(truth_path)])
    return con.sql("""
        WITH t AS (SELECT slide_id, count(*) AS true_rbc FROM truth WHERE kind = 'rbc' GROUP BY slide_id),
             p AS (SELECT slide_id, count(*) AS found_rbc FROM cells WHERE kind = 'rbc' GROUP BY slide_id)
        SELECT count(*) AS slides, sum(true_rbc) AS true_rbc, sum(coalesce(found_rbc, 0)) AS found_rbc,
               100.0 * avg(abs(coalesce(found_rbc, 0) - true_rbc) / true_rbc) AS mean_abs_count_error_pct,
               100.0 * (sum(coalesce(found_rbc, 0)) - sum(true_rbc)) / sum(true_rbc) AS pooled_count_error_pct
        FROM t LEFT JOIN p USING (slide_id)""").to_arrow_table()


def agreement_tables(run_dir: str, truth_path: Path) -> list[tuple[str, pa.Table]]:
    con = connect(run_dir)
    try:
        return [
            ("screening flags vs synthetic truth", flag_agreement(con)),
            ("RBC counts vs synthetic truth", count_agreement(con, truth_path)),
        ]
    finally:
        con.close()
