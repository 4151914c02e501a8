"""The guest agent that runs inside each VM (stdlib only)."""
