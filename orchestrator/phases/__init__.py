"""What runs before a merge (alignment, data statistics, dynamic training, similarity) or after
it (task-aware models), each on the executor."""
