"""Documents, corpus tables, clusters and the task types each corpus allows."""
