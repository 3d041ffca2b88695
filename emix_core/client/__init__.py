"""The facility side: the hub client, the sender, the receiver and the facility home."""
