"""What sits on disk: model dirs, HF checkpoints, exports, and the guard on every destination."""
