"""Scale-out on torch.distributed: the (pipeline, data, expert) mesh, ZeRO-1, expert all-to-all, DualPipeV,
distributed checkpoints, and a planner for full clusters."""
