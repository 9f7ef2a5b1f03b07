"""Evaluating pruned models: zero-shot accuracy (lm-eval), local cloze tasks, the comparison
report, speed and memory (transformers, vLLM, llama.cpp), and LoRA recovery.

Pure library code (no Prefect). Submodules import their heavy dependencies (lm-eval, peft,
vLLM) inside the functions that need them, so ``import selfprune.evaluate`` stays cheap::

    from selfprune.evaluate.zeroshot import evaluate_zero_shot, PAPER_TASKS
    from selfprune.evaluate.cloze import build_cloze_task, build_lastword_task
    from selfprune.evaluate.report import report, plan_report, build_rows  # selfprune.report
    from selfprune.evaluate.speed import measure, vllm_measure, llamacpp_measure
    from selfprune.evaluate.lora import lora_recover
"""
