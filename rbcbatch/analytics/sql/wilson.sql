-- The Wilson score interval of k successes in n as DuckDB macros (fractions; NULL when n is 0).
-- Unlike p ± z·SE it stays inside [0, 1] and is not empty at 0 or n; the clamp only removes
-- rounding below 0 or above 1. z = {z}, the two-sided 95% quantile of the standard normal.
CREATE OR REPLACE MACRO wilson_centre(k, n) AS
    (k::DOUBLE / n + {z}^2 / (2 * n)) / (1 + {z}^2 / n);
CREATE OR REPLACE MACRO wilson_half(k, n) AS
    {z} * sqrt((k::DOUBLE / n) * (1 - k::DOUBLE / n) / n + {z}^2 / (4 * n * n))
    / (1 + {z}^2 / n);
CREATE OR REPLACE MACRO wilson_lo(k, n) AS
    CASE WHEN n > 0 THEN greatest(0.0, wilson_centre(k, n) - wilson_half(k, n)) END;
CREATE OR REPLACE MACRO wilson_hi(k, n) AS
    CASE WHEN n > 0 THEN least(1.0, wilson_centre(k, n) + wilson_half(k, n)) END;
