"""What the command line drives a run with: monitor, reporters, run folder, preflight, validation."""
