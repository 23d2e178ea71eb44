"""The transformers code that `pascal-dist export --format hf` copies into an export: standalone (torch and transformers
only, never pascal_dist), so the export loads where pascal-dist is not installed."""
