"""What a model is to the pruner: its architecture, checkpoint, devices, activation statistics and perplexity."""
