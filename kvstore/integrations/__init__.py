"""Integrations of kvstore with inference engines; each needs its engine installed and is imported on its own.

``kvstore.integrations.vllm``: ``KVStoreConnector``, a vLLM KV connector (extra ``vllm``).
"""
