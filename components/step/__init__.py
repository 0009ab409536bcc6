"""One training step: the LightningModule, the handle components see, the update, and the step's metrics."""
