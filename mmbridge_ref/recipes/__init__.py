"""One recipe per family: its data, its evaluation, its measurement tables (no model code)."""
