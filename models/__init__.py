"""Networks only: no DeepSpeed, no process groups, no config objects."""
