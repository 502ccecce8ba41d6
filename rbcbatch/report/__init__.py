"""Reports for people: the text summary and the self-contained HTML page of a run."""
