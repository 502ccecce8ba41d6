"""Job specs (YAML) for screening, nightly, training and shift jobs: checked, run here, or
submitted to a cluster through the Ray Jobs API."""
