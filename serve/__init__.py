"""Ray Serve applications: the OpenAI-compatible vLLM endpoint built on `ray.serve.llm`."""
