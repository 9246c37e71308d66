"""From adapters to deployable models: merge, combine, export (HF folder, GGUF, Ollama), each verified."""
