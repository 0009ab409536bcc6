"""Pure tensor and list maths, registered by name where a recipe picks it: advantage estimators, policy
losses and aggregations, and the rollout-selection rules samplers share. Nothing here holds state."""
