"""Analysis of trained models: representation statistics, layer jumps."""
