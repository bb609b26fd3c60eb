"""Train state, the jitted step, the loop, checkpoints and metric writers."""
