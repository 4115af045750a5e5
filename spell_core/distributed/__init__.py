"""torchrun process groups, FSDP2 sharded training and context parallel attention."""
