"""The GPU probes, one module each. Import them from :mod:`peergpu.agent.gpus`, the public face."""
