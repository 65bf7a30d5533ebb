"""Text: the checkpoint's tokenizer (Hugging Face ``tokenizers``), its chat
template (Jinja2, sandboxed) and stop strings over generated tokens."""
