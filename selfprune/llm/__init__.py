"""The LLM client: one chat request and its reply (:mod:`.chat`), the bounded OpenAI-compatible HTTP
transport (:mod:`.transport`, :mod:`.endpoint`). It knows nothing of the searches that ask it."""
