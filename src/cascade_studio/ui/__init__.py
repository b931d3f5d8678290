"""The studio: a Gradio web UI over the shared job queue and history store."""
