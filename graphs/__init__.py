"""LangGraph workflows over the model. Importing this package never imports torch."""
