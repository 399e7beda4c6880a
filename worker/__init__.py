"""Worker processes: read jobs from a model's stream, batch, infer, reply."""
