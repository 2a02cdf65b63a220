"""What a user runs around training: evaluation, generation, the layer viewer, the loss benchmark."""
