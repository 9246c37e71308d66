"""Training: the Plan, SFTTrainer with lorakit's loss and callbacks, checkpoints and resume, one run end to end."""
