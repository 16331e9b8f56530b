"""Analysis tools run as methods (they return the pre-trained model): task-vector cosine similarity."""
