"""What every trainer shares: the batch order and loss, the optimizer rules, the LoRA set-up."""
