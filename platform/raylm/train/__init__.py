"""The one Ray Train loop shared by pre-training, SFT and the DPO family."""
