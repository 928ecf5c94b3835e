"""The error family every command reports, and small helpers every layer may use."""
