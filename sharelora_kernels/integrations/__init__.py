"""Integrations of sharelora_kernels with other libraries (they call the core; the core never imports them).

``peft_method``: shared adapters as a PEFT method (``ShareLoRAPeftConfig``, imported on first use).
``peft_hook``: makes PEFT know that method as soon as PEFT is imported (standard library only, so a
plain ``import sharelora_kernels`` stays fast).
"""
