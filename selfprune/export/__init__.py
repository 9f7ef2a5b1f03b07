"""Exports of a pruned model: Hugging Face (transformers), DeciLM (vLLM) and GGUF (llama.cpp), and the llama.cpp runtime."""
