"""``kandinsky3 serve``: an image server that existing clients and a browser can use (install the ``serve`` extra).

- :mod:`.jobs` — the bounded job queue, one worker per device (no HTTP, no torch).
- :mod:`.engine` — the model's pipelines on one device, a request, and the runner of a job.
- :mod:`.prompt_cache` — the LRU cache of encoded prompts.
- :mod:`.loras` — the LoRA files of ``--lora-dir`` and the adapters each worker has loaded (``<lora:name:scale>``).
- :mod:`.app` — the FastAPI application: auth, limits, errors, the queue's lifetime.
- :mod:`.a1111`, :mod:`.openai_api` — the AUTOMATIC1111 (/sdapi/v1) and OpenAI Images (/v1) APIs.
- :mod:`.ui`, :mod:`.ui_backend` — the Gradio web UI at / and its view of the queue.
- :mod:`.cli` — the command's flags.

Nothing here is imported by ``import kandinsky3``.
"""
