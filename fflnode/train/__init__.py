"""Training: data sets and partitions, models, the local inner loop and the outer step."""
