"""Per-exit quality: losses, generations, TriviaQA, judge pairs, tables and plots, sweeps."""
