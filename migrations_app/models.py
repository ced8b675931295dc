"""Migration jobs land here with the workflow (issue 3)."""
