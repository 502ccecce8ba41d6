-- The `sites` view: per site, scanner and stain, how many slides, patients and cells, the mean
-- red-cell diameter and the class mix (red cells not touching the image edge).
WITH per_slide AS (
    SELECT slide_id, count(*) AS n_rbc, sum(diameter_um) AS diameter_sum_um,
           {class_counts}
    FROM cells WHERE kind = 'rbc' AND NOT touches_edge GROUP BY slide_id
), joined AS (
    SELECT s.site, s.scanner, s.stain,
           count(*) AS n_slides,
           count(DISTINCT (s.cohort, s.patient_id)) AS n_patients,
           sum(s.n_objects)::BIGINT AS n_objects,
           coalesce(sum(c.n_rbc), 0)::BIGINT AS n_rbc,
           sum(c.diameter_sum_um) / nullif(sum(c.n_rbc), 0) AS diameter_mean_um,
           {share_sums}
    FROM slides s LEFT JOIN per_slide c USING (slide_id)
    GROUP BY s.site, s.scanner, s.stain
)
SELECT site, scanner, stain, n_slides, n_patients, n_objects, n_rbc, diameter_mean_um,
    {share_pcts}
FROM joined
ORDER BY site, scanner, stain
