"""Task metrics (accuracy, base/new HM, retrieval recall) and cost figures (parameters, memory, time)."""
