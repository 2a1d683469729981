"""The names a self-checkpointing node job and its submit file share, without torch: the
planner writes them into `node.sub` (`checkpoint_exit_code`, `transfer_checkpoint_files`)."""

CHECKPOINT_EXIT = 85  # ERESTART, the code the HTCondor manual suggests for a checkpoint exit
TENSORS_FILE = "checkpoint.safetensors"
STATE_FILE = "checkpoint.json"
FILES = (TENSORS_FILE, STATE_FILE)
