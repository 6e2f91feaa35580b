"""The prepare phase: data sources' records, templates, PHI screening, contamination, and the
prepared dataset."""
