"""Where a run's results go: the run folder, its tables' schemas and the OME-Zarr masks."""
