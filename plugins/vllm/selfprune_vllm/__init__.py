"""vLLM plugin for selfprune exports: registers ``SelfpruneForCausalLM`` with vLLM's model registry.

vLLM calls :func:`register` in every process it starts (the ``vllm.general_plugins`` entry point),
so ``vllm.LLM(EXPORT_DIR)`` and ``vllm serve EXPORT_DIR`` find the architecture a selfprune export
names in its ``config.json``. The class is given as a string, which vLLM imports lazily.
"""

ARCHITECTURE = "SelfpruneForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "selfprune_vllm.model:SelfpruneForCausalLM")
