"""Training over the swarm: fine-tuning through remote spans, data-parallel training, and the
job records ``layerchain train status``, the gateway and the MCP server read (``jobs``)."""
