-- The `patients` view: indicators per patient from red-cell rows (cells cut by the image edge
-- left out), grades, then the flags with their rules and evidence. Needs the Wilson macros.
-- Names in curly brackets are filled in by rbcbatch.analytics.views.patients_sql from the
-- classes, the screening rules and the grading scheme.
WITH people AS (
    SELECT cohort, patient_id, any_value(site) AS site, any_value(label) AS label,
           count(*) AS n_slides,
           avg(hb_g_dl) AS hb_g_dl, avg(mchc_g_dl) AS mchc_g_dl, avg(rdw_pct) AS rdw_pct,
           coalesce(list_sort(list(DISTINCT um_per_px_source)
                              FILTER (WHERE um_per_px_source IS NOT NULL)),
                    []::VARCHAR[]) AS um_per_px_sources
    FROM slides GROUP BY cohort, patient_id
), rbc AS (
    SELECT cohort, patient_id,
           count(*) AS n_rbc,
           {class_counts},
           avg(diameter_um) AS diameter_mean_um,
           stddev_samp(diameter_um) AS diameter_sd_um
    FROM cells WHERE kind = 'rbc' AND NOT touches_edge GROUP BY cohort, patient_id
), joined AS (
    SELECT p.*, coalesce(r.n_rbc, 0) AS n_rbc,
           {share_counts},
           r.diameter_mean_um, r.diameter_sd_um
    FROM people p LEFT JOIN rbc r USING (cohort, patient_id)
), indicators AS (
    SELECT *,
    {share_columns},
    100.0 * diameter_sd_um / diameter_mean_um AS diameter_cv_pct,
    100.0 * ({micro_hypo}) / nullif(n_rbc, 0) AS micro_hypo_pct
    FROM joined
), graded AS (
    SELECT *,
    {grade_columns},
    CASE WHEN {insufficient} THEN 'insufficient'
         WHEN spherocyte_pct >= {hs_spherocyte_pct} THEN 'positive'
         ELSE 'negative' END AS hs_flag,
    CASE WHEN {insufficient} THEN 'insufficient'
         WHEN micro_hypo_pct >= {anemia_micro_hypo_pct}
           OR diameter_mean_um < {anemia_mean_diameter_um} THEN 'positive'
         ELSE 'negative' END AS anemia_flag
    FROM indicators
)
SELECT cohort, patient_id, site, label, n_slides, n_rbc,
    {share_outputs},
    diameter_mean_um, diameter_sd_um, diameter_cv_pct,
    {share_count_outputs},
    hb_g_dl, mchc_g_dl, rdw_pct,
    grading_scheme, {grade_outputs},
    hs_flag,
    {hs_rule} AS hs_rule,
    {hs_evidence} AS hs_evidence,
    mchc_g_dl > {hs_mchc_g_dl} AS hs_supported_by_cbc,
    anemia_flag,
    {anemia_rule} AS anemia_rule,
    {anemia_evidence} AS anemia_evidence,
    hb_g_dl < {anemia_hb_g_dl} AS anemia_supported_by_cbc
FROM graded
ORDER BY cohort, patient_id
