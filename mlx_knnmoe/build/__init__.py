"""Building a memory: the gradient step on the routing logits, eta choice, the pipeline,
checkpoints and data-parallel builds."""
