"""Training: the run spec and config schema, the Trainer, its step, loop, hooks and checkpoints;
the training of SFT+ICT heads."""
