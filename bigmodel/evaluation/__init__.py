"""Task metrics as each field computes them (`metrics`)."""
