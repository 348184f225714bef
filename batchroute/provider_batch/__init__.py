"""Provider batch APIs (OpenAI Files + Batches, Anthropic Message Batches) as an execution
mode: which calls go there and when a group goes out (``plan``, pure), request and result
files (``formats``, pure), the HTTP client (``client``), batch pricing (``pricing``),
``[provider_batch]`` settings (``settings``) and the tick that gathers, submits, polls and
collects (``runner``). The pipeline parks a job for it (`pipeline._to_provider_batch`) and
the tick hands each answer back to the pipeline's own end (`pipeline.conclude`).
"""
