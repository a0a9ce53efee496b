"""skyclass: live classroom streaming and replay."""
